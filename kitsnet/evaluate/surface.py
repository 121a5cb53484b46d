"""Surface Dice of two boolean masks, equal to DeepMind's ``surface-distance`` package.

The official KiTS21 code computes Surface Dice with ``compute_surface_distances`` +
``compute_surface_dice_at_tolerance``: the fraction of the surface area of both masks (surfels
from the package's 2x2x2 neighbour-code table) that lies within the tolerance of the other
surface.  :func:`surface_dice` gives the same number much faster:

1. Surfels are found exactly as the package finds them (``scipy.ndimage.correlate`` with the
   package's kernel on a zero-padded crop; the package itself crops to the bounding box and pads
   with zeros, so the crop changes nothing but a translation) and weighted with the package's
   own area table.
2. Instead of a Euclidean distance transform of the whole per-class bounding box (most of the
   package's time), each surfel looks for a surfel of the other mask among the few voxel
   offsets whose distance is within the tolerance.  Those offsets are selected with the same
   floating-point expression scipy's ``distance_transform_edt`` uses (offset x sampling,
   squared, summed over axes in order, square root), so ``distance <= tolerance`` is decided
   the same way.  The only numerical difference left is the order in which surfel areas are
   summed (the package sums them sorted by distance): a few ulps, far below the required 1e-9.

For a spacing so fine that the tolerance spans many voxels the offset list would grow large; then
the package itself is run on the per-class crop (still exact, just slower).

``surface-distance`` 0.1 still uses ``np.Inf`` (removed in NumPy 2) on its empty-mask paths and
the deprecated ``scipy.ndimage.filters`` / ``scipy.ndimage.morphology`` namespaces.  Because the
fine-spacing fallback above runs the package, this module keeps it working: instead of vendoring
it, :func:`patch_surface_distance` (applied on import) points the module's own ``np`` and
``ndimage`` globals at small compatibility proxies; NumPy itself is not modified.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage
import surface_distance
import surface_distance.lookup_tables as sd_lookup_tables
import surface_distance.metrics as sd_metrics

__all__ = ["patch_surface_distance", "surface_dice"]

#: Above this many voxel offsets within the tolerance, the neighbour search stops paying off and
#: the package's distance transform is used on the per-class crop instead.
_MAX_OFFSETS = 343


# --------------------------------------------------------------------------------------------
# surface-distance 0.1 compatibility (NumPy 2, SciPy >= 1.8 namespaces)
# --------------------------------------------------------------------------------------------


class _NumpyCompat(types.ModuleType):
    """``numpy`` as surface-distance expects it: everything from NumPy plus ``Inf``/``NaN``.

    Only the package's module-level ``np`` name is replaced, so the NumPy-2 behaviour of the rest
    of the process (where ``np.Inf`` rightly does not exist) is untouched.
    """

    Inf = np.inf
    NaN = np.nan

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class _NdimageCompat(types.ModuleType):
    """``scipy.ndimage`` that also answers the removed ``filters``/``morphology`` sub-namespaces.

    They are the same functions as the top-level ones; going through the top level avoids the
    DeprecationWarnings today and the AttributeError once SciPy 2 removes them.
    """

    def __getattr__(self, name: str) -> Any:
        if name in ("filters", "morphology"):
            return scipy.ndimage
        return getattr(scipy.ndimage, name)


def patch_surface_distance() -> None:
    """Make surface-distance 0.1 run on NumPy 2 / new SciPy without vendoring it (idempotent)."""
    if not hasattr(np, "Inf") and not isinstance(sd_metrics.np, _NumpyCompat):
        sd_metrics.np = _NumpyCompat("numpy")
    if not isinstance(sd_metrics.ndimage, _NdimageCompat):
        sd_metrics.ndimage = _NdimageCompat("scipy.ndimage")


patch_surface_distance()


# --------------------------------------------------------------------------------------------
# Surfels, offsets within tolerance, overlap
# --------------------------------------------------------------------------------------------


def _mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a (small, cropped) boolean mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """The package's neighbour-code -> surfel-area table (256 entries), cached per spacing."""
    table = sd_lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    table.flags.writeable = False  # shared through the cache
    return table


@functools.lru_cache(maxsize=64)
def _offsets_within(spacing: tuple[float, float, float], tolerance: float) -> np.ndarray:
    """Integer voxel offsets whose distance is ``<= tolerance``, nearest first, shape (k, 3).

    The distance is computed with exactly the operations of ``scipy.ndimage.
    distance_transform_edt`` (int offset -> float64, ``*= sampling`` per axis, square in place,
    ``np.add.reduce`` over the axis dimension, ``sqrt``), so an offset is kept exactly when the
    package's distance transform would call that distance within tolerance.
    """
    radius = [int(math.floor(tolerance / s)) + 1 for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids]).astype(np.int32)
    dt = offsets.astype(np.float64)
    sampling = np.asarray(spacing, dtype=np.float64)
    for ii in range(len(sampling)):
        dt[ii, ...] *= sampling[ii]
    np.multiply(dt, dt, dt)
    dist = np.sqrt(np.add.reduce(dt, axis=0))
    keep = dist <= tolerance
    order = np.argsort(dist[keep], kind="stable")
    result = np.ascontiguousarray(offsets[:, keep].T[order])
    result.flags.writeable = False  # shared through the cache
    return result


def _neighbour_codes(mask: np.ndarray, pad: Sequence[int], kernel: np.ndarray) -> np.ndarray:
    """Neighbour codes of ``mask`` zero-padded by ``pad`` voxels per side, as the package does.

    The package crops to the bounding box, adds one zero layer on the high side and correlates
    with its 2x2x2 kernel (``cval=0`` supplies the low side).  Padding on every side gives the
    same codes, translated, and leaves room for the neighbour look-ups.  Returns a C-contiguous
    uint8 array.
    """
    padded = np.zeros([n + 2 * p for n, p in zip(mask.shape, pad, strict=True)], dtype=np.uint8)
    padded[tuple(slice(p, p + n) for n, p in zip(mask.shape, pad, strict=True))] = mask
    return scipy.ndimage.correlate(padded, kernel, mode="constant", cval=0)


def _overlap_area(
    src_idx: np.ndarray, src_area: np.ndarray, dst_border: np.ndarray, shifts: np.ndarray
) -> float:
    """Total area of the source surfels with a destination surfel at one of ``shifts``.

    ``shifts`` are flat index offsets, nearest first; surfels already matched drop out, so
    most work is done by the first one or two offsets.
    """
    remaining = np.arange(src_idx.size)
    for shift in shifts:
        if remaining.size == 0:
            break
        found = dst_border[src_idx[remaining] + shift]
        remaining = remaining[~found]
    hit = np.ones(src_idx.size, dtype=bool)
    hit[remaining] = False
    return float(np.sum(src_area[hit]))


def surface_dice(
    mask_gt: np.ndarray,
    mask_pred: np.ndarray,
    spacing: tuple[float, float, float],
    tolerance: float,
    perm: tuple[int, int, int] = (0, 1, 2),
) -> float:
    """Surface Dice of two non-empty boolean masks (same crop), equal to the package's value.

    The masks may be a transposed view of the label map (``mask axis k`` is ``array axis
    perm[k]``), so that an F-ordered NIfTI array is processed as a C-contiguous one without a
    slow transposing copy.  Everything geometric (spacing, area table, offsets and their
    distances) stays in the array's own axis order, so the numbers do not change; only the
    correlation kernel and the flat offsets are permuted, which is exact integer arithmetic.
    """
    box = _mask_box(mask_gt | mask_pred)
    assert box is not None  # callers pass non-empty masks
    mask_gt = mask_gt[box]
    mask_pred = mask_pred[box]
    offsets = _offsets_within(spacing, tolerance)
    if len(offsets) > _MAX_OFFSETS:  # very fine spacing: let the package do it on the crop
        inverse = tuple(int(a) for a in np.argsort(perm))
        dist = surface_distance.compute_surface_distances(
            np.ascontiguousarray(mask_gt.transpose(inverse)),
            np.ascontiguousarray(mask_pred.transpose(inverse)),
            spacing,
        )
        return float(surface_distance.compute_surface_dice_at_tolerance(dist, tolerance))

    offsets = offsets[:, list(perm)]  # offsets along the mask's axes
    kernel = sd_lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL.transpose(perm)
    pad = [int(np.abs(offsets[:, a]).max(initial=0)) + 1 for a in range(3)]
    codes_gt = _neighbour_codes(mask_gt, pad, kernel).ravel()
    codes_pred = _neighbour_codes(mask_pred, pad, kernel).ravel()
    full = 0b11111111
    border_gt = (codes_gt != 0) & (codes_gt != full)
    border_pred = (codes_pred != 0) & (codes_pred != full)
    table = _surfel_area_table(spacing)
    idx_gt = np.flatnonzero(border_gt)
    idx_pred = np.flatnonzero(border_pred)
    area_gt = table[codes_gt[idx_gt]]
    area_pred = table[codes_pred[idx_pred]]

    shape = [n + 2 * p for n, p in zip(mask_gt.shape, pad, strict=True)]
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    shifts = offsets.astype(np.int64) @ strides
    overlap_gt = _overlap_area(idx_gt, area_gt, border_pred, shifts)
    overlap_pred = _overlap_area(idx_pred, area_pred, border_gt, shifts)
    return (overlap_gt + overlap_pred) / (float(np.sum(area_gt)) + float(np.sum(area_pred)))
