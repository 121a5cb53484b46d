"""Compact class probabilities on the original grid, for ensembling.

Why: an ensemble (nnU-Net's: average the members' softmax on the original grid, then arg-max)
needs every member's probabilities.  nnU-Net's ``--save_probabilities`` stores them as float32
over the whole image, C x 4 bytes per voxel whose low-order bits are noise that barely
compresses: the largest output of a run.  Here they are

* quantised to uint8 that sum to exactly 255 over the classes (largest-remainder rounding, ties
  to the lower class), so a voxel's probabilities are off by less than 1/255 each, and the
  certain background far from the kidneys is the constant (255, 0, ..., 0), which compresses to
  almost nothing;
* stored only inside a box outside which every voxel is exactly (255, 0, ..., 0).  The box is
  found on the logits' own grid: voxels where max_{c>=1}(l_c - l_0) > -T, T = log(2 * 255 * C).
  Elsewhere every p_c (c >= 1) is at most 1/(2 * 255 * C), which quantises to 0 (and p_0 to
  255).  Linear interpolation is a convex combination of its taps, so an output voxel none of
  whose taps (nonzero weights) falls in that source box keeps the bound: the output box is the
  per-axis range of output indices with a tap inside the source box.

The probabilities are nnU-Net's export (resample the logits linearly, softmax) and are computed
in the same pass, slab by slab, as the arg-max segmentation of
:func:`kitsnet.core.resample.resample_argmax`, which they must not change: the segmentation
here is byte-identical to it (same taps, same float32 operations, the same running maximum).

A region-based network (:mod:`kitsnet.core.regions`) has one sigmoid per region instead: its
file holds ``kind`` "regions", each region's probability rounded to uint8 on its own (no sum),
0 outside the box, which is where some region logit exceeds -log(2 * 255) (below it a sigmoid
is under 1/(2 * 255) and rounds to 0).  Averaging regions and classes (nnU-Net cannot mix
them) is :mod:`kitsnet.predict.averaging`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kitsnet.core.io import KitsnetError, save_npz
from kitsnet.core.resample import (
    SlabDecoder,
    Spacing,
    resample_slab,
    separate_z_axis,
    slab_plans,
)

__all__ = [
    "CLASSES",
    "FORMAT",
    "LEVELS",
    "REGIONS_KIND",
    "CompactProbabilities",
    "background_margin",
    "export_logits",
    "load_probabilities",
    "output_box",
    "quantise",
    "quantise_regions",
    "save_probabilities",
    "source_box",
]

FORMAT = "kitsnet-compact-probabilities/1"
LEVELS = 255  # quantisation steps: a voxel's classes sum to exactly this
CLASSES, REGIONS_KIND = "classes", "regions"  # softmax over labels, sigmoid per region
Box = list[list[int]]  # [lo, hi) per axis


def background_margin(n_classes: int, kind: str = CLASSES) -> float:
    """T: where every foreground logit is more than T below the background's, each foreground
    probability is at most 1 / (2 * LEVELS * C) and quantises to 0 (see the module docstring);
    for regions, where every region logit is below -T, every sigmoid is below 1 / (2 * LEVELS)
    and rounds to 0."""
    return math.log(2 * LEVELS * (n_classes if kind == CLASSES else 1))


def _extent(box: Box) -> tuple[int, ...]:
    return tuple(int(hi - lo) for lo, hi in box)


def _empty_box(ndim: int) -> Box:
    return [[0, 0] for _ in range(ndim)]


@dataclass
class CompactProbabilities:
    """uint8 probabilities ``q`` (C, *box extent) inside ``box`` of a grid of ``shape``; every
    voxel outside the box is (255, 0, ..., 0), or all 0 for ``kind`` "regions"."""

    q: np.ndarray
    box: Box
    shape: tuple[int, ...]
    kind: str = CLASSES

    @property
    def n_classes(self) -> int:
        return int(self.q.shape[0])

    def region_q(self, box: Box) -> np.ndarray:
        """The uint8 values over any ``box`` of the grid (parts outside ``self.box`` filled)."""
        out = np.zeros((self.n_classes, *_extent(box)), dtype=np.uint8)
        if self.kind == CLASSES:
            out[0] = LEVELS
        inter = [[max(a, c), min(b, d)] for (a, b), (c, d) in zip(box, self.box, strict=True)]
        if all(lo < hi for lo, hi in inter):
            dst = tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(inter, box, strict=True))
            src = tuple(
                slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(inter, self.box, strict=True)
            )
            out[(slice(None), *dst)] = self.q[(slice(None), *src)]
        return out

    def region(self, box: Box) -> np.ndarray:
        """float32 probabilities (q / 255) over ``box`` of the grid."""
        return self.region_q(box).astype(np.float32) / np.float32(LEVELS)

    def dense(self) -> np.ndarray:
        """float32 (C, *shape) probabilities of the whole grid (C x 4 bytes per voxel)."""
        return self.region([[0, s] for s in self.shape])


def quantise(probs: np.ndarray) -> np.ndarray:
    """uint8 (C, ...) summing to exactly 255 per voxel: floor(255 p), then the units still
    missing go to the classes with the largest remainders (ties: the lower class index).

    Each class is then within 1/255 of its probability.  ``probs`` must sum to 1 over axis 0
    (a softmax); the missing units are clipped to 0..C so float rounding cannot break the sum.
    """
    v = np.asarray(probs, dtype=np.float32) * np.float32(LEVELS)
    np.clip(v, 0, LEVELS, out=v)
    floor = np.floor(v)
    rem = v - floor
    q = floor.astype(np.int16)
    missing = np.clip(LEVELS - q.sum(0), 0, q.shape[0])
    for c in range(q.shape[0]):
        ahead = np.zeros(q.shape[1:], dtype=np.int16)  # classes ranked before c
        for d in range(q.shape[0]):
            if d != c:
                ahead += (rem[d] >= rem[c]) if d < c else (rem[d] > rem[c])
        q[c] += ahead < missing
    return q.astype(np.uint8)


def quantise_regions(probs: np.ndarray) -> np.ndarray:
    """uint8 (R, ...) region probabilities: each rounded to the nearest 1/255 on its own."""
    v = np.asarray(probs, dtype=np.float32) * np.float32(LEVELS)
    return np.rint(np.clip(v, 0, LEVELS, out=v)).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Sigmoid in place (float32), as nnU-Net's export applies it to region logits."""
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += 1
    np.reciprocal(x, out=x)
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 in place (float32), as nnU-Net's export applies it to the logits."""
    x -= x.max(0, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(0, keepdims=True)
    return x


def source_box(logits: np.ndarray, chunk: int = 16, kind: str = CLASSES) -> Box | None:
    """Bounding box of the voxels where some foreground logit is within T of the background's
    (regions: some region logit above -T), read ``chunk`` planes at a time; None when there
    is none."""
    n_cls, shape = logits.shape[0], logits.shape[1:]
    margin = np.float32(-background_margin(n_cls, kind))
    hit = [np.zeros(s, dtype=bool) for s in shape]
    for z0 in range(0, shape[0], chunk):
        lg = np.asarray(logits[:, z0 : z0 + chunk], dtype=np.float32)
        if kind != CLASSES:
            diff = lg.max(0)
        else:
            diff = lg[1:].max(0) - lg[0] if n_cls > 1 else np.full(lg.shape[1:], -np.inf)
        mask = diff > margin
        for a in range(len(shape)):
            seen = mask.any(axis=tuple(b for b in range(len(shape)) if b != a))
            if a == 0:
                hit[0][z0 : z0 + chunk] |= seen
            else:
                hit[a] |= seen
    if not hit[0].any():
        return None
    return [[int(np.argmax(h)), int(len(h) - np.argmax(h[::-1]))] for h in hit]


def output_box(src: Box | None, plans: list[tuple[np.ndarray, np.ndarray]]) -> Box:
    """Per axis, the range of output indices with a nonzero-weight tap inside ``src``."""
    if src is None:
        return _empty_box(len(plans))
    box = []
    for (lo, hi), (idx, w) in zip(src, plans, strict=True):
        touch = ((idx >= lo) & (idx < hi) & (w != 0)).any(1)
        if not touch.any():
            return _empty_box(len(plans))
        box.append([int(np.argmax(touch)), int(len(touch) - np.argmax(touch[::-1]))])
    return box


def export_logits(
    logits: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    spacing: Spacing | None = None,
    anisotropy_threshold: float = 3.0,
    new_spacing: Spacing | None = None,
    slab: int = 16,
    class_order: Sequence[int] | None = None,
) -> tuple[np.ndarray, CompactProbabilities]:
    """(C, *S) logits -> the uint8 labels on ``new_shape`` (byte-identical to
    ``resample_argmax`` with the same arguments) and the compact probabilities there: class
    probabilities (softmax), or with ``class_order`` region probabilities (sigmoid; labels by
    nnU-Net's ``regions_class_order``).

    Memory: one slab of resampled logits per class at a time, as ``resample_argmax``, plus the
    softmax of the slab's part of the box: never the whole resampled volume in float.
    """
    kind = CLASSES if class_order is None else REGIONS_KIND
    squash = _softmax if class_order is None else _sigmoid
    level = quantise if class_order is None else quantise_regions
    new_shape = tuple(int(s) for s in new_shape)
    n_cls, shape = logits.shape[0], logits.shape[1:]
    axis = separate_z_axis(spacing, new_spacing, anisotropy_threshold)
    plans = slab_plans(shape, new_shape, axis)
    box = output_box(source_box(logits, kind=kind), plans)
    q = np.empty((n_cls, *_extent(box)), dtype=np.uint8)
    seg = np.empty(new_shape, dtype=np.uint8)
    (b0, b1), inplane = box[0], tuple(slice(lo, hi) for lo, hi in box[1:])
    for z0 in range(0, new_shape[0], slab):
        z1 = min(z0 + slab, new_shape[0])
        i0, i1 = max(z0, b0), min(z1, b1)
        crop = (slice(i0 - z0, i1 - z0), *inplane) if i0 < i1 else None
        decode = SlabDecoder(class_order)
        probs = []
        for c in range(n_cls):
            x = resample_slab(logits, c, z0, z1, plans)
            if crop is not None:
                probs.append(x[crop].copy())  # before the running maximum overwrites class 0
            decode.add(c, x)
        seg[z0:z1] = decode.labels
        if crop is not None:
            q[:, i0 - b0 : i1 - b0] = level(squash(np.stack(probs)))
    return seg, CompactProbabilities(q=q, box=box, shape=new_shape, kind=kind)


def save_probabilities(path: str | os.PathLike[str], cp: CompactProbabilities) -> None:
    """Write ``cp`` as a compressed .npz (keys probabilities, box, shape, format, kind),
    atomically."""
    save_npz(
        path,
        probabilities=cp.q,
        box=np.asarray(cp.box, dtype=np.int64).reshape(len(cp.shape), 2),
        shape=np.asarray(cp.shape, dtype=np.int64),
        format=np.array(FORMAT),
        kind=np.array(cp.kind),
    )


def _problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays of a compact-probabilities file, or None."""
    missing = {"probabilities", "box", "shape", "format"} - set(arrays)
    if missing:
        return f"not compact probabilities: missing {sorted(missing)}"
    if str(arrays["format"]) != FORMAT:
        return f"format {str(arrays['format'])!r}, expected {FORMAT!r}"
    kind = str(arrays.get("kind", CLASSES))
    if kind not in (CLASSES, REGIONS_KIND):
        return f"kind {kind!r}, expected {CLASSES!r} or {REGIONS_KIND!r}"
    q, box, shape = arrays["probabilities"], arrays["box"], arrays["shape"]
    if q.dtype != np.uint8 or box.shape != (len(shape), 2) or q.ndim != len(shape) + 1:
        return f"inconsistent arrays: probabilities {q.dtype} {q.shape}, box {box.shape}"
    if any(
        not 0 <= lo <= hi <= s for (lo, hi), s in zip(box.tolist(), shape.tolist(), strict=True)
    ):
        return f"box {box.tolist()} outside the grid {shape.tolist()}"
    if q.shape[1:] != _extent(box.tolist()):
        return f"probabilities {q.shape} do not fill the box {box.tolist()}"
    sums = q.sum(0, dtype=np.uint16)
    if kind == CLASSES and sums.size and not np.all(sums == LEVELS):
        return f"{int((sums != LEVELS).sum())} voxels whose probabilities do not sum to {LEVELS}"
    return None


def load_probabilities(
    path: str | os.PathLike[str], case: str | None = None
) -> CompactProbabilities:
    """Read and check a file of :func:`save_probabilities`; KitsnetError naming it (and
    ``case``) if it is missing, unreadable or inconsistent."""
    path, who = Path(path), f"{case}: " if case else ""
    if not path.is_file():
        raise KitsnetError(f"{who}{path}: compact probabilities file is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile, zlib and numpy raise many types for damaged files
        raise KitsnetError(
            f"{who}{path}: unreadable compact probabilities ({type(exc).__name__}: {exc})"
        ) from exc
    problem = _problem(arrays)
    if problem:
        raise KitsnetError(f"{who}{path}: {problem}")
    shape = tuple(int(s) for s in arrays["shape"])
    kind = str(arrays.get("kind", CLASSES))  # files of kitsnet 0.x before regions: classes
    return CompactProbabilities(arrays["probabilities"], arrays["box"].tolist(), shape, kind)
