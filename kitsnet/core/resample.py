"""Resampling to another grid: images (cubic), label maps (label-safe) and logits (arg-max).

One resampling function serves both directions (to the plan's spacing and back to the original
grid), so geometry round-trips by construction: voxel centres are aligned (``grid_mode``), so an
image resampled to another spacing and back covers the same physical extent.

The arithmetic is nnU-Net v2's ``default_resampling`` (checked against it in
``tests/nnunet/test_preprocess_nnunet.py``): spline zoom with edge replication, no anti-aliasing,
and the output clipped to the input's value range (skimage ``resize(clip=True)``, which removes
cubic over- and undershoot).  Images: third-order spline.  Masks: each label's indicator
resampled linearly, arg-maxed over labels (label-safe: no label can appear that is not in the
input).  Anisotropic cases (slice spacing > ``threshold`` x in-plane on either grid, with a
single coarsest axis) are resampled slice by slice in-plane with that order and with nearest
neighbour along the slice axis, to avoid spline ringing across thick slices.

Two implementations of the same arithmetic.  ``exact=True`` calls ``ndimage.zoom`` (float64,
bit-identical to nnU-Net; labels use it so that exact ties break as nnU-Net's do).  The default
for images and logits is separable: a zoom on a regular grid is a tensor product of 1D
interpolations, so each axis is spline-prefiltered and interpolated on its own (4 taps per
axis for cubic instead of 4^3 per voxel), in float32.  Same coefficients, same boundary
handling (scipy pads 12 edge voxels before prefiltering), so it differs from the exact path only
by float32 rounding (~1e-6 of the value range; ``tests/unit/preprocess/test_preprocess.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Spacing = tuple[float, ...] | list[float]


def _lowres_axis(spacing: Spacing, threshold: float) -> int | None:
    """The single coarsest axis of an anisotropic spacing (max/min > threshold), else None.

    As nnU-Net: two axes tied for the coarsest (e.g. 0.24 x 1.25 x 1.25) mean no separate axis.
    """
    sp = np.asarray(spacing, dtype=float)
    if not sp.max() / sp.min() > threshold:
        return None
    axes = np.where(sp.max() / sp == 1)[0]
    return int(axes[0]) if len(axes) == 1 else None


def separate_z_axis(
    spacing: Spacing | None, new_spacing: Spacing | None = None, threshold: float = 3.0
) -> int | None:
    """nnU-Net's separate-z rule: the current grid decides if it is anisotropic, else the new."""
    for sp in (spacing, new_spacing):
        if sp is not None and np.max(sp) / np.min(sp) > threshold:
            return _lowres_axis(sp, threshold)
    return None


def _zoom_clipped(
    chan: np.ndarray, new_shape: tuple[int, ...], order: int, dtype: type
) -> np.ndarray:
    """skimage ``resize(order, mode='edge', anti_aliasing=False, clip=True)``, as nnU-Net.

    ndimage interpolates in float64 whatever the in/out dtypes; clipping after the cast to
    ``dtype`` gives the same values as clipping before it, since the bounds are input values.
    """
    zoom = [n / o for n, o in zip(new_shape, chan.shape, strict=True)]
    out = ndimage.zoom(chan, zoom, order=order, mode="nearest", grid_mode=True, output=dtype)
    return np.clip(out, chan.min(), chan.max(), out=out)


SPLINE_PAD = 12  # scipy's edge padding before the spline prefilter for mode="nearest"


def axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (both (n_out, order + 1)) of one axis of a zoom.

    ``ndimage.zoom(grid_mode=True, mode="nearest")`` coordinates: output voxel i samples input
    position (i + 0.5) n_in / n_out - 0.5.  Order 1: linear between the two neighbours, indices
    clamped (edge replication).  Order 3: cubic B-spline weights over 4 neighbours of the
    prefiltered coefficients, indices into the coefficients padded by ``SPLINE_PAD``.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    f = np.floor(x)
    t = x - f
    f = f.astype(np.int64)
    if order == 1:
        idx = np.clip(np.stack([f, f + 1], 1), 0, n_in - 1)
        w = np.stack([1 - t, t], 1)
    elif order == 3:
        idx = np.stack([f - 1, f, f + 1, f + 2], 1) + SPLINE_PAD
        w = (
            np.stack(
                [(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1
            )
            / 6
        )
    else:
        raise ValueError(f"separable resampling supports orders 1 and 3, not {order}")
    return idx, w


def apply_taps(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_j w[:, j] * x.take(idx[:, j], axis): one axis of a separable interpolation.

    Gathers with ``np.take`` (fast along any axis, unlike ``torch.index_select`` along the
    last one) into one reused buffer and accumulates in place: two output-sized buffers.
    """
    view = [1] * x.ndim
    view[axis] = len(idx)
    w = w.astype(np.float32)
    out = np.take(x, idx[:, 0], axis=axis)
    if idx.shape[1] == 1 and np.all(w == 1):
        return out
    out *= w[:, 0].reshape(view)
    buf = np.empty_like(out)
    for j in range(1, idx.shape[1]):
        np.take(x, idx[:, j], axis=axis, out=buf)
        buf *= w[:, j].reshape(view)
        out += buf
    return out


def zoom_axis(x: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Interpolate a float32 array along one axis to ``n_out`` samples (see ``axis_taps``)."""
    if order == 3:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (SPLINE_PAD, SPLINE_PAD)
        x = np.pad(x, pad, mode="edge")
        ndimage.spline_filter1d(x, 3, axis=axis, output=x, mode="nearest")
    idx, w = axis_taps(x.shape[axis] - (2 * SPLINE_PAD if order == 3 else 0), n_out, order)
    return apply_taps(x, axis, idx, w)


def nearest_axis_index(n_in: int, n_out: int) -> np.ndarray:
    """Source slice of each output slice for nearest neighbour along the slice axis, with
    nnU-Net's own coordinates (voxel centres aligned, edge replicated)."""
    scale = float(n_in) / n_out
    coords = scale * (np.arange(n_out) + 0.5) - 0.5
    src = ndimage.map_coordinates(
        np.arange(n_in, dtype=np.float64), coords[None], order=0, mode="nearest"
    )
    return src.astype(np.intp)


def _zoom_separable(
    chan: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None, dtype: type
) -> np.ndarray:
    """The separable equivalent of ``_resample_channel`` (orders 1 and 3).

    Clipping follows the exact path: to the whole input's range, or, when slices are
    resampled one by one (``axis``), to each slice's own range before the slice axis is done.
    """
    x = np.ascontiguousarray(chan, dtype=np.float32)
    if axis is None:
        lo, hi = x.min(), x.max()
    else:
        others = tuple(a for a in range(x.ndim) if a != axis)
        lo, hi = x.min(axis=others, keepdims=True), x.max(axis=others, keepdims=True)
    # Shrinking axes first keeps the intermediates small.
    for a in sorted(range(x.ndim), key=lambda a: new_shape[a] / chan.shape[a]):
        if a != axis and x.shape[a] != new_shape[a]:
            x = zoom_axis(x, a, new_shape[a], order)
    if order == 3:
        np.clip(x, lo, hi, out=x)
    if axis is not None and x.shape[axis] != new_shape[axis]:
        x = np.take(x, nearest_axis_index(x.shape[axis], new_shape[axis]), axis=axis)
    return x.astype(dtype, copy=False)


def _resample_channel(
    chan: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None, dtype: type
) -> np.ndarray:
    if axis is None:
        return _zoom_clipped(chan, new_shape, order, dtype)
    inplane = tuple(s for a, s in enumerate(new_shape) if a != axis)
    n_in = chan.shape[axis]
    tmp = np.empty(new_shape[:axis] + (n_in,) + new_shape[axis + 1 :], dtype=dtype)
    for i in range(n_in):
        index = (slice(None),) * axis + (i,)
        tmp[index] = _zoom_clipped(chan[index], inplane, order, dtype)
    if n_in == new_shape[axis]:
        return tmp
    return np.take(tmp, nearest_axis_index(n_in, new_shape[axis]), axis=axis)


def resample(
    array: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    order: int,
    spacing: Spacing | None = None,
    anisotropy_threshold: float = 3.0,
    new_spacing: Spacing | None = None,
    dtype: type = np.float32,
    exact: bool = False,
) -> np.ndarray:
    """Resample a (C, *S) or (*S) float array to ``new_shape`` (spatial), ``dtype`` out.

    ``spacing`` is the spacing of the array's grid and ``new_spacing`` (optional) that of the
    target grid; they only decide the anisotropic treatment (see :func:`separate_z_axis`).
    ``exact`` interpolates in float64 with ``ndimage.zoom`` (bit-identical to nnU-Net); the
    default is the separable float32 path for orders 1 and 3 (order 0 is always exact).
    """
    squeeze = array.ndim == len(new_shape)
    data = array[None] if squeeze else array
    new_shape = tuple(int(s) for s in new_shape)
    out = np.empty((data.shape[0], *new_shape), dtype=dtype)
    axis = separate_z_axis(spacing, new_spacing, anisotropy_threshold)
    for c in range(data.shape[0]):
        if tuple(data[c].shape) == new_shape:
            out[c] = data[c]
        elif exact or order not in (1, 3):
            out[c] = _resample_channel(np.asarray(data[c]), new_shape, order, axis, dtype)
        else:
            out[c] = _zoom_separable(np.asarray(data[c]), new_shape, order, axis, dtype)
    return out[0] if squeeze else out


def resample_argmax(
    logits: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    spacing: Spacing | None = None,
    anisotropy_threshold: float = 3.0,
    new_spacing: Spacing | None = None,
    slab: int = 16,
    class_order: Sequence[int] | None = None,
) -> np.ndarray:
    """Arg-max over classes of (C, *S) logits resampled linearly to ``new_shape`` -> uint8.

    Equal to ``resample(logits, new_shape, 1, ...).argmax(0)`` (nnU-Net's export: resample
    the logits, softmax, arg-max; softmax keeps the order) up to float32 rounding, but never
    holds the resampled logits: the output is built ``slab`` planes at a time along the first
    axis from the few input planes they need, one class at a time with a running maximum, so
    exporting a 1059 x 512 x 796 case needs tens of MB beyond the logits and the labels.

    With ``class_order`` the channels are region logits (a region-based network): instead of
    the arg-max, region ``c`` paints label ``class_order[c]`` where its resampled logit is
    above 0 (sigmoid above 0.5), later regions over earlier ones
    (:func:`kitsnet.core.regions.regions_to_labels`, nnU-Net's ``regions_class_order``).
    """
    new_shape = tuple(int(s) for s in new_shape)
    n_cls, shape = logits.shape[0], logits.shape[1:]
    axis = separate_z_axis(spacing, new_spacing, anisotropy_threshold)
    plans = slab_plans(shape, new_shape, axis)
    seg = np.empty(new_shape, dtype=np.uint8)
    for z0 in range(0, new_shape[0], slab):
        z1 = min(z0 + slab, new_shape[0])
        decode = SlabDecoder(class_order)
        for c in range(n_cls):
            decode.add(c, resample_slab(logits, c, z0, z1, plans))
        seg[z0:z1] = decode.labels
    return seg


class SlabDecoder:
    """Labels of one slab from its channels, fed one at a time: the running arg-max of class
    logits, or (``class_order``) the thresholded region logits painted in order.  The one
    decoding :func:`resample_argmax` and the export of probabilities share."""

    def __init__(self, class_order: Sequence[int] | None = None) -> None:
        self.class_order = class_order
        self.best: np.ndarray | None = None
        self.labels: np.ndarray | None = None

    def add(self, c: int, x: np.ndarray) -> None:
        """Channel ``c``'s resampled logits (may be overwritten: copy them first if needed)."""
        if self.labels is None:
            self.labels = np.zeros(x.shape, dtype=np.uint8)
        if self.class_order is not None:
            self.labels[x > 0] = self.class_order[c]
        elif self.best is None:
            self.best = x
        else:
            better = x > self.best
            self.labels[better] = c
            np.maximum(self.best, x, out=self.best)


def slab_plans(
    shape: tuple[int, ...], new_shape: tuple[int, ...], axis: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per axis, the taps of the logits' resampling: nearest along a separate slice ``axis``
    (:func:`separate_z_axis`), else linear (:func:`axis_taps`)."""
    plans = []
    for a, (n_in, n_out) in enumerate(zip(shape, new_shape, strict=True)):
        if a == axis:
            src = nearest_axis_index(n_in, n_out)
            plans.append((src[:, None], np.ones((len(src), 1))))
        else:
            plans.append(axis_taps(n_in, n_out, 1))
    return plans


def resample_slab(
    logits: np.ndarray, c: int, z0: int, z1: int, plans: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Class ``c`` of (C, *S) ``logits`` resampled (float32) for output planes ``z0:z1``, from
    only the input planes they need: the one computation :func:`resample_argmax` and the
    export of probabilities (:mod:`kitsnet.predict.probabilities`) share, so their labels agree
    byte for byte."""
    idx0, w0 = plans[0]
    lo, hi = int(idx0[z0:z1].min()), int(idx0[z0:z1].max()) + 1
    x = apply_taps(np.asarray(logits[c, lo:hi], np.float32), 0, idx0[z0:z1] - lo, w0[z0:z1])
    for a in range(1, len(plans)):
        x = apply_taps(x, a, *plans[a])
    return x


def resample_labels(
    seg: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    spacing: Spacing | None = None,
    anisotropy_threshold: float = 3.0,
    new_spacing: Spacing | None = None,
) -> np.ndarray:
    """Label-safe resampling as nnU-Net v2 (batchgenerators ``resize_segmentation``, order 1).

    Each label's indicator is resampled linearly and every voxel takes the label with the
    largest score, so only input labels appear and no voxel is left unlabelled where three
    labels meet.  Exact ties (a sample point halfway between two labels) go to the nearest
    neighbour's label when it is one of the tied ones, else to the smallest tied label.
    """
    new_shape = tuple(int(s) for s in new_shape)
    seg = np.asarray(seg)
    if tuple(seg.shape) == new_shape:
        return seg.astype(np.uint8)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(new_shape, labels[0], dtype=np.uint8)
    geom = (spacing, anisotropy_threshold, new_spacing)
    nearest = resample(seg.astype(np.float32), new_shape, 0, *geom, exact=True).astype(np.uint8)
    out = np.empty(new_shape, dtype=np.uint8)
    best = nn_top = None
    for label in labels:
        score = resample(
            (seg == label).astype(np.float32), new_shape, 1, *geom, dtype=np.float64, exact=True
        )
        is_nn = nearest == label
        if best is None:
            best, nn_top = score, is_nn & (score > 0)
            out[:] = label
            continue
        nn_top |= (score == best) & (score > 0) & is_nn
        better = score > best
        nn_top[better] = is_nn[better]
        out[better] = label
        np.maximum(best, score, out=best)
    out[nn_top] = nearest[nn_top]
    return out
