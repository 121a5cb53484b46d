"""KiTS21 evaluation: Dice and Surface Dice per hierarchical class, identical to the official code.

The definition is the one of the official kits21 repository (``kits21/configuration/labels.py``
and ``kits21/evaluation/metrics.py``):

* three hierarchical evaluation classes (HECs), each a union of labels: kidney = {1, 2, 3},
  masses = {2, 3}, tumor = {2};
* Dice per class, ``2|A∩B| / (|A| + |B|)``;
* Surface Dice per class at the class's tolerance in mm, computed with DeepMind's
  ``surface-distance`` package: the fraction of the surface area of both masks (surfels from the
  package's 2x2x2 neighbour-code table) that lies within the tolerance of the other surface;
* both masks empty: Dice 1 and Surface Dice 1; exactly one empty: Dice 0 and Surface Dice 0;
* the voxel spacing comes from the image header, in the array's axis order.

:func:`reference_score_arrays` is that code spelled out literally on the whole volume; tests and
``benchmarks/bench_evaluate.py`` compare against it.  :func:`score_arrays` computes the same
numbers much faster:

1. One reduction over the slowest memory axis of each volume gives both the label check and the
   extent of the foreground along that axis; a second reduction over that slab only gives the
   other two extents.  Everything after that works on the bounding box of both label maps.  (The
   official code builds each class mask on the whole volume, label by label, and counts it
   several times: about 80% of its run time on KiTS21 volumes.)
2. Surfels are found exactly as the package finds them (``scipy.ndimage.correlate`` with the
   package's kernel on a zero-padded crop; the package itself crops to the bounding box and pads
   with zeros, so the crop changes nothing but a translation) and weighted with the package's
   own area table.
3. Instead of a Euclidean distance transform of the whole per-class bounding box (most of the
   package's time), each surfel looks for a surfel of the other mask among the few voxel
   offsets whose distance is within the tolerance.  Those offsets are selected with the same
   floating-point expression scipy's ``distance_transform_edt`` uses (offset x sampling,
   squared, summed over axes in order, square root), so ``distance <= tolerance`` is decided
   the same way.  The only numerical difference left is the order in which surfel areas are
   summed (the package sums them sorted by distance): a few ulps, far below the required 1e-9.

For a spacing so fine that the tolerance spans many voxels the offset list would grow large; then
the package itself is run on the per-class crop (still exact, just slower).

``surface-distance`` 0.1 still uses ``np.Inf`` (removed in NumPy 2) on its empty-mask paths and
the deprecated ``scipy.ndimage.filters`` / ``scipy.ndimage.morphology`` namespaces.  Instead of
vendoring it, :func:`_patch_surface_distance` points the module's own ``np`` and ``ndimage``
globals at small compatibility proxies; NumPy itself is not modified.  The KiTS21 rules handle
empty masks before the package is called anyway, as the official code does.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import types
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.ndimage
import surface_distance
import surface_distance.lookup_tables as sd_lookup_tables
import surface_distance.metrics as sd_metrics

from kitsnet.io import KitsnetError, atomic_path, load_volume

__all__ = [
    "HEC_LABELS",
    "SD_TOLERANCE_MM",
    "METRIC_COLUMNS",
    "REFERENCE_FILENAME",
    "score_arrays",
    "reference_score_arrays",
    "reference_score_case",
    "score_case",
    "evaluate_pairs",
    "pair_folder",
    "write_scores",
    "add_cli",
]

#: Hierarchical evaluation classes (official names: kidney_and_mass, mass, tumor).
HEC_LABELS: dict[str, tuple[int, ...]] = {
    "kidney": (1, 2, 3),
    "masses": (2, 3),
    "tumor": (2,),
}

#: Surface Dice tolerance per class in mm (KiTS21 values, authoritative for this project).
SD_TOLERANCE_MM: dict[str, float] = {
    "kidney": 1.0330772532390826,
    "masses": 1.1328796488598762,
    "tumor": 1.1498198361434828,
}

METRIC_COLUMNS: list[str] = [
    "dice_kidney",
    "dice_masses",
    "dice_tumor",
    "sd_kidney",
    "sd_masses",
    "sd_tumor",
]

#: File name of the reference inside a KiTS21 case folder (official ``GT_SEGM_FNAME``).
REFERENCE_FILENAME = "aggregated_MAJ_seg.nii.gz"

#: Largest label value allowed (0 background, 1 kidney, 2 tumor, 3 cyst).
MAX_LABEL = 3

#: Prediction and reference spacings must agree to this many mm.  NIfTI stores zooms as float32,
#: so files written from the same header agree exactly; anything larger is a different grid.
SPACING_ATOL_MM = 1e-5

#: Above this many voxel offsets within the tolerance, the neighbour search stops paying off and
#: the package's distance transform is used on the per-class crop instead.
_MAX_OFFSETS = 343

_NII_SUFFIX = ".nii.gz"


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


def _patch_surface_distance() -> None:
    """Make surface-distance 0.1 run on NumPy 2 / new SciPy without vendoring it (idempotent)."""
    if not hasattr(np, "Inf") and not isinstance(sd_metrics.np, _NumpyCompat):
        sd_metrics.np = _NumpyCompat("numpy")
    if not isinstance(sd_metrics.ndimage, _NdimageCompat):
        sd_metrics.ndimage = _NdimageCompat("scipy.ndimage")


_patch_surface_distance()


# --------------------------------------------------------------------------------------------
# Reference: the official computation, literally, on the whole volume
# --------------------------------------------------------------------------------------------


def _construct_hec_literal(segmentation: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """Official ``construct_HEC_from_segmentation`` for a tuple of labels."""
    mask = np.zeros(segmentation.shape, dtype=bool)
    for label in labels:
        mask[segmentation == label] = True
    return mask


def _medpy_dc(result: np.ndarray, reference: np.ndarray) -> float:
    """``medpy.metric.dc`` as the official code calls it (0 when both are empty)."""
    intersection = np.count_nonzero(result & reference)
    size = np.count_nonzero(result) + np.count_nonzero(reference)
    if size == 0:
        return 0.0
    return 2.0 * intersection / float(size)


def reference_score_arrays(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """The official kits21 metrics on the whole volume, kept literal so it can serve as oracle.

    Mirrors ``compute_metrics_for_label`` of ``kits21/evaluation/metrics.py``: whole-volume HEC
    masks, emptiness by ``np.sum``, medpy-style Dice, and ``compute_surface_distances`` +
    ``compute_surface_dice_at_tolerance`` of the surface-distance package.  ``spacing`` must be
    in the arrays' axis order.  Slow by design; use :func:`score_arrays` for real work.
    """
    if pred.shape != ref.shape:
        raise KitsnetError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing_mm = tuple(float(s) for s in spacing)
    dice: dict[str, float] = {}
    sdice: dict[str, float] = {}
    for name, labels in HEC_LABELS.items():
        mask_pred = _construct_hec_literal(pred, labels)
        mask_gt = _construct_hec_literal(ref, labels)
        gt_empty = np.sum(mask_gt) == 0
        pred_empty = np.sum(mask_pred) == 0
        if gt_empty and pred_empty:
            dice[name] = 1.0
            sdice[name] = 1.0
            continue
        dice[name] = float(_medpy_dc(mask_pred, mask_gt))
        if gt_empty or pred_empty:
            sdice[name] = 0.0
            continue
        dist = surface_distance.compute_surface_distances(mask_gt, mask_pred, spacing_mm)
        sdice[name] = float(
            surface_distance.compute_surface_dice_at_tolerance(dist, SD_TOLERANCE_MM[name])
        )
    return _as_metric_dict(dice, sdice)


def reference_score_case(
    case: str, pred_path: str | os.PathLike[str], ref_path: str | os.PathLike[str]
) -> dict:
    """:func:`reference_score_arrays` on two files, with the prediction's spacing like the
    official ``compute_metrics_for_case``; the oracle for tests and the benchmark."""
    pred = load_volume(pred_path, case)
    ref = load_volume(ref_path, case)
    return {"case": case, **reference_score_arrays(pred.array, ref.array, pred.spacing)}


def _as_metric_dict(dice: dict[str, float], sdice: dict[str, float]) -> dict[str, float]:
    out = {f"dice_{name}": float(dice[name]) for name in HEC_LABELS}
    out.update({f"sd_{name}": float(sdice[name]) for name in HEC_LABELS})
    return {col: out[col] for col in METRIC_COLUMNS}


# --------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------


def _slow_axis(arr: np.ndarray) -> int:
    """The axis with the largest stride: reducing over the others streams memory once."""
    return int(np.argmax(np.abs(np.asarray(arr.strides))))


def _label_profile(arr: np.ndarray, axis: int) -> np.ndarray:
    """Largest label in each index along ``axis``, after checking every label is in 0..3.

    One reduction over the whole volume (for unsigned and signed integers alike: signed values
    are viewed as unsigned so negatives become huge and fail the same ``<= 3`` test).  Raises
    ``ValueError`` with the offending value; callers add the case and file.
    """
    others = tuple(a for a in range(arr.ndim) if a != axis)
    if arr.dtype == bool:
        return arr.view(np.uint8).max(axis=others)
    if np.issubdtype(arr.dtype, np.integer):
        view = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
        profile = view.max(axis=others)
        if profile.size and int(profile.max()) > MAX_LABEL:
            bad = arr[arr.view(view.dtype) > MAX_LABEL]
            raise ValueError(f"label {int(bad.flat[0])} outside 0-{MAX_LABEL}")
        return profile
    if np.issubdtype(arr.dtype, np.floating):
        profile = arr.max(axis=others)
        low = arr.min() if arr.size else 0.0
        if np.isnan(profile).any():
            raise ValueError("NaN in label map")
        if profile.size and (profile.max() > MAX_LABEL or low < 0):
            value = profile.max() if profile.max() > MAX_LABEL else low
            raise ValueError(f"label {value:g} outside 0-{MAX_LABEL}")
        return profile
    raise ValueError(f"unsupported label dtype {arr.dtype}")


def _check_integral(crop: np.ndarray) -> None:
    """Floating label maps must hold whole numbers; only the foreground crop can hold others."""
    if np.issubdtype(crop.dtype, np.floating) and not np.array_equal(crop, np.round(crop)):
        raise ValueError("non-integer label value")


def _foreground_box(
    pred: np.ndarray, ref: np.ndarray, axis: int, prof_pred: np.ndarray, prof_ref: np.ndarray
) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``(pred > 0) | (ref > 0)``, or ``None`` when both are all background.

    The extent along ``axis`` comes from the label profiles already computed; the other two come
    from one projection of the occupied slab only.
    """
    occupied = np.flatnonzero((prof_pred > 0) | (prof_ref > 0))
    if occupied.size == 0:
        return None
    box: list[slice] = [slice(None)] * 3
    box[axis] = slice(int(occupied[0]), int(occupied[-1]) + 1)
    slab = tuple(box)
    # labels are validated non-negative here, so "max > 0" is "any foreground"
    projection = (pred[slab].max(axis=axis) > 0) | (ref[slab].max(axis=axis) > 0)
    rest = [a for a in range(3) if a != axis]
    for k, a in enumerate(rest):
        idx = np.flatnonzero(projection.any(axis=1 - k))
        box[a] = slice(int(idx[0]), int(idx[-1]) + 1)
    return tuple(box)  # type: ignore[return-value]


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


def _surface_dice(
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


def _hec_masks(crop: np.ndarray) -> dict[str, np.ndarray]:
    """The three HEC masks of a uint8 crop whose labels are known to lie in 0..3."""
    return {"kidney": crop > 0, "masses": crop >= 2, "tumor": crop == 2}


def _score_validated(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    axis: int,
    prof_pred: np.ndarray,
    prof_ref: np.ndarray,
) -> dict[str, float]:
    box = _foreground_box(pred, ref, axis, prof_pred, prof_ref)
    if box is None:  # nothing anywhere: every class is "both empty"
        return _as_metric_dict(dict.fromkeys(HEC_LABELS, 1.0), dict.fromkeys(HEC_LABELS, 1.0))
    ref_crop = ref[box]
    pred_crop = pred[box]
    for crop in (pred_crop, ref_crop):
        _check_integral(crop)
    # Work on a view whose axes run from largest to smallest stride (the transpose of an
    # F-ordered NIfTI array), so the uint8 copy is a straight memory copy, not a transpose.
    perm = tuple(int(a) for a in np.argsort([-abs(s) for s in ref_crop.strides], kind="stable"))
    masks_gt = _hec_masks(np.ascontiguousarray(ref_crop.transpose(perm), dtype=np.uint8))
    masks_pred = _hec_masks(np.ascontiguousarray(pred_crop.transpose(perm), dtype=np.uint8))
    dice: dict[str, float] = {}
    sdice: dict[str, float] = {}
    for name in HEC_LABELS:
        mp, mg = masks_pred[name], masks_gt[name]
        n_pred = int(np.count_nonzero(mp))
        n_gt = int(np.count_nonzero(mg))
        if n_pred == 0 and n_gt == 0:
            dice[name], sdice[name] = 1.0, 1.0
        elif n_pred == 0 or n_gt == 0:
            dice[name], sdice[name] = 0.0, 0.0
        else:
            dice[name] = 2.0 * int(np.count_nonzero(mp & mg)) / float(n_pred + n_gt)
            sdice[name] = _surface_dice(mg, mp, spacing, SD_TOLERANCE_MM[name], perm)
    return _as_metric_dict(dice, sdice)


def _normalise_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise KitsnetError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def score_arrays(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The six KiTS21 metrics of one case, fast; equal to :func:`reference_score_arrays`.

    ``pred`` and ``ref`` are label maps (0..3) on the same grid, ``spacing`` in their axis order.
    """
    if pred.ndim != 3 or pred.shape != ref.shape:
        raise KitsnetError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing_mm = _normalise_spacing(spacing)
    axis = _slow_axis(ref)
    profiles = []
    for who, arr in (("prediction", pred), ("reference", ref)):
        try:
            profiles.append(_label_profile(arr, axis))
        except ValueError as exc:
            raise KitsnetError(f"{who}: {exc}") from exc
    try:
        return _score_validated(pred, ref, spacing_mm, axis, profiles[0], profiles[1])
    except ValueError as exc:  # non-integer float labels, found on the crop
        raise KitsnetError(f"prediction/reference: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Files, folders, CLI
# --------------------------------------------------------------------------------------------


def score_case(
    case: str, pred_path: str | os.PathLike[str], ref_path: str | os.PathLike[str]
) -> dict:
    """Load one prediction/reference pair, check it, and return ``{"case": case, **metrics}``.

    Every problem (missing or unreadable file, shape or spacing mismatch, label outside 0-3)
    raises :class:`KitsnetError` naming the case and the file, because in a run over hundreds
    of cases that is what a person needs to find the culprit.  The prediction's spacing is used
    for the surface distances, as in the official ``compute_metrics_for_case``.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred = load_volume(pred_path, case)
    ref = load_volume(ref_path, case)
    if pred.array.shape != ref.array.shape:
        raise KitsnetError(
            f"{case}: prediction {pred_path} has shape {pred.array.shape} but reference "
            f"{ref_path} has shape {ref.array.shape}"
        )
    if not np.allclose(pred.spacing, ref.spacing, rtol=0.0, atol=SPACING_ATOL_MM):
        raise KitsnetError(
            f"{case}: prediction {pred_path} has spacing {pred.spacing} mm but reference "
            f"{ref_path} has spacing {ref.spacing} mm"
        )
    try:
        spacing = _normalise_spacing(pred.spacing)
    except KitsnetError as exc:
        raise KitsnetError(f"{case}: {pred_path}: {exc}") from exc
    axis = _slow_axis(ref.array)
    profiles = []
    for path, arr in ((pred_path, pred.array), (ref_path, ref.array)):
        try:
            profiles.append(_label_profile(arr, axis))
        except ValueError as exc:
            raise KitsnetError(f"{case}: {path}: {exc}") from exc
    try:
        metrics = _score_validated(pred.array, ref.array, spacing, axis, *profiles)
    except ValueError as exc:  # non-integer float labels, found on the crop
        raise KitsnetError(f"{case}: {pred_path} / {ref_path}: {exc}") from exc
    return {"case": case, **metrics}


def _score_case_star(pair: tuple[str, Path, Path]) -> dict:
    return score_case(*pair)


def evaluate_pairs(pairs: list[tuple[str, Path, Path]], jobs: int = 1) -> pd.DataFrame:
    """Score every ``(case, prediction, reference)``; one row per case, sorted by case.

    ``jobs > 1`` spreads cases over a process pool: cases are independent and the work is
    numpy/scipy bound, so processes (not threads) use all cores.
    """
    columns = ["case", *METRIC_COLUMNS]
    if not pairs:
        return pd.DataFrame(columns=columns)
    cases = [case for case, _, _ in pairs]
    duplicates = sorted({c for c in cases if cases.count(c) > 1})
    if duplicates:
        raise KitsnetError(f"case listed more than once: {', '.join(duplicates)}")
    workers = max(1, min(int(jobs), len(pairs)))
    if workers == 1:
        rows = [_score_case_star(pair) for pair in pairs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_score_case_star, pairs))
    df = pd.DataFrame(rows, columns=columns)
    return df.sort_values("case", kind="stable").reset_index(drop=True)


def _case_name(path: Path) -> str | None:
    """``case_00003`` for ``case_00003.nii.gz``; ``None`` for other or hidden (temporary) files."""
    name = path.name
    if name.startswith(".") or not name.endswith(_NII_SUFFIX) or not path.is_file():
        return None
    return name[: -len(_NII_SUFFIX)]


def pair_folder(
    pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str]
) -> list[tuple[str, Path, Path]]:
    """Pair ``pred_dir/<case>.nii.gz`` with its reference, sorted by case.

    The reference is ``ref_dir/<case>.nii.gz`` (flat layout) or, KiTS21 dataset layout,
    ``ref_dir/<case>/aggregated_MAJ_seg.nii.gz`` (KiTS23: ``segmentation.nii.gz``).  Every
    prediction needs a reference.  In the
    flat layout every reference also needs a prediction (the folder is meant to mirror the
    predictions, so a missing prediction is an error, not a silently better mean); a KiTS21
    dataset folder holds all cases, so there only the predictions decide which cases are scored.
    Hidden files (``atomic_path`` temporaries) are ignored.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for label, folder in (("prediction", pred_dir), ("reference", ref_dir)):
        if not folder.is_dir():
            raise KitsnetError(f"{label} folder {folder} does not exist")
    preds = {c: p for p in pred_dir.iterdir() if (c := _case_name(p)) is not None}
    flat_refs = {c: p for p in ref_dir.iterdir() if (c := _case_name(p)) is not None}
    if not preds:
        raise KitsnetError(f"no <case>{_NII_SUFFIX} predictions in {pred_dir}")
    pairs = []
    for case in sorted(preds):
        ref = flat_refs.get(case)
        if ref is None:
            # KiTS21's label file, else KiTS23's
            candidates = [ref_dir / case / n for n in (REFERENCE_FILENAME, "segmentation.nii.gz")]
            ref = next((c for c in candidates if c.is_file()), None)
            if ref is None:
                raise KitsnetError(
                    f"{case}: prediction {preds[case]} has no reference: none of "
                    f"{ref_dir / (case + _NII_SUFFIX)}, {', '.join(map(str, candidates))} exists"
                )
        pairs.append((case, preds[case], ref))
    for case in sorted(set(flat_refs) - set(preds)):
        raise KitsnetError(
            f"{case}: reference {flat_refs[case]} has no prediction: "
            f"{pred_dir / (case + _NII_SUFFIX)} is missing"
        )
    return pairs


def write_scores(df: pd.DataFrame, out_csv: str | os.PathLike[str]) -> None:
    """Write the per-case table atomically, floats at full (round-trip) precision."""
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format=None)


def _format_means(df: pd.DataFrame) -> str:
    lines = [f"{len(df)} cases"]
    for col in METRIC_COLUMNS:
        mean = float(df[col].mean()) if len(df) else float("nan")
        lines.append(f"mean {col:12s} {mean:.8f}")
    return "\n".join(lines)


def _run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``kitsnet evaluate``: pair, score, write the CSV, print the means."""
    pairs = pair_folder(args.pred_dir, args.ref_dir)
    df = evaluate_pairs(pairs, jobs=args.jobs)
    write_scores(df, args.out)
    print(_format_means(df))
    print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kitsnet evaluate``; the handler is stored as ``func`` in the parsed args."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against KiTS21 references (Dice, Surface Dice per class)",
        description=(
            "Pair <case>.nii.gz in --pred-dir with --ref-dir/<case>.nii.gz or "
            f"--ref-dir/<case>/{REFERENCE_FILENAME}, write one row per case and print the means."
        ),
    )
    parser.add_argument("--pred-dir", required=True, type=Path, help="folder of predictions")
    parser.add_argument("--ref-dir", required=True, type=Path, help="folder of references")
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: all cores)",
    )
    parser.set_defaults(func=_run_evaluate)
