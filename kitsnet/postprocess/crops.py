"""Each case of the postprocessing decision as compressed crops, and Dice from them.

Memory (300 full-size cases of up to 1059 x 512 x 796 voxels within a few GB): every step only
removes components of the prediction, so each case is reduced once, when it is loaded, to a
:class:`CaseCrop`: the prediction and the reference cropped to the bounding box of the
prediction's foreground (plus one voxel, clipped), both zlib-compressed in memory (label maps
compress 50-500x), and the number of reference voxels of each region outside the crop.  The
prediction is zero outside its crop before and after any step, so :func:`crop_dice` (the crop
plus those counts) is exactly the Dice of the full arrays, with the conventions of
:mod:`kitsnet.evaluate.metrics` (both masks empty: 1; exactly one empty: 0).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kitsnet.core.io import KitsnetError, load_volume
from kitsnet.evaluate.metrics import HEC_LABELS, MAX_LABEL, SPACING_ATOL_MM
from kitsnet.postprocess.apply import voxel_volume
from kitsnet.postprocess.candidates import smallest_component_mm3
from kitsnet.postprocess.components import CHUNK_VOXELS, foreground_box, memory_order, slabs

__all__ = ["CaseCrop", "load_case_crop", "crop_dice", "compress"]

#: zlib level for crops: level 1 already shrinks label maps 50x+, and is several times faster.
ZLIB_LEVEL = 1


@dataclass(frozen=True)
class CaseCrop:
    """One case of the decision: compressed uint8 crops and what lies outside them.

    ``shape`` is the crop's shape (axes in the volume's memory order); ``pred`` and ``ref`` are
    the zlib-compressed C-ordered bytes; ``ref_outside`` the reference's kidney, masses and tumor
    voxels outside the crop; ``smallest_ref_mm3`` the volume of the reference's smallest
    kidney-region component (``None`` if the reference is empty); ``changed`` whether the
    accepted steps changed the prediction.
    """

    case: str
    fold: int
    shape: tuple[int, ...]
    voxel_mm3: float
    pred: bytes
    ref: bytes
    ref_outside: tuple[int, int, int]
    smallest_ref_mm3: float | None
    changed: bool = False

    def pred_array(self) -> np.ndarray:
        """The prediction's crop as a new writable uint8 array."""
        return decompress(self.pred, self.shape)

    def ref_array(self) -> np.ndarray:
        """The reference's crop as a new uint8 array."""
        return decompress(self.ref, self.shape)


def compress(arr: np.ndarray) -> bytes:
    """zlib stream of ``arr``'s bytes in C order, fed slab by slab: no full-size copy of a
    non-contiguous crop (a view) is ever made."""
    packer = zlib.compressobj(ZLIB_LEVEL)
    chunks = [packer.compress(np.ascontiguousarray(arr[sl])) for sl in slabs(arr.shape)]
    return b"".join(chunks) + packer.flush()


def decompress(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of :func:`compress`, decompressed piecewise into its final buffer (not
    via one ``bytes`` of the whole crop and then a copy: half the peak memory)."""
    out = np.empty(int(np.prod(shape, dtype=np.int64)), np.uint8)
    unpacker = zlib.decompressobj()
    pos, tail = 0, data
    while pos < out.size:
        piece = unpacker.decompress(tail, min(CHUNK_VOXELS, out.size - pos))
        tail = unpacker.unconsumed_tail
        if not piece:
            break
        out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
        pos += len(piece)
    if pos != out.size:
        raise ValueError(f"compressed crop holds {pos} voxels, expected {out.size}")
    return out.reshape(shape)


def _region_mask(arr: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """Mask of a KiTS21 region in labels 0..3, from comparisons: ``np.isin`` would index a table
    with an intp copy of ``arr`` (8 bytes per voxel)."""
    lo, hi = min(labels), max(labels)
    if set(labels) == set(range(lo, hi + 1)) and hi == MAX_LABEL:
        return arr >= lo
    mask = arr == labels[0]
    for label in labels[1:]:
        mask |= arr == label
    return mask


def _region_counts(arr: np.ndarray) -> np.ndarray:
    """Voxels of each KiTS21 region (in :data:`HEC_LABELS` order), slab by slab."""
    out = np.zeros(len(HEC_LABELS), np.int64)
    for sl in slabs(arr.shape):
        part = arr[sl]
        out += [np.count_nonzero(_region_mask(part, lab)) for lab in HEC_LABELS.values()]
    return out


def _as_labels(arr: np.ndarray, case: str, path: Path) -> np.ndarray:
    """``arr`` as uint8 labels, or a :class:`KitsnetError` naming the case and the file.

    Checked on the whole volume with two reductions (min, max) and, for floating-point files,
    for whole numbers on the foreground's box (outside it every voxel is exactly 0).
    """
    if arr.dtype == np.uint8:
        high, low = (int(arr.max()), 0) if arr.size else (0, 0)
    elif np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        high, low = (float(arr.max()), float(arr.min())) if arr.size else (0, 0)
    else:
        raise KitsnetError(f"{case}: {path}: unsupported label dtype {arr.dtype}")
    if not (np.isfinite(high) and np.isfinite(low)) or high > 3 or low < 0:
        raise KitsnetError(f"{case}: {path}: label {high if high > 3 else low} outside 0-3")
    if np.issubdtype(arr.dtype, np.floating):
        box = foreground_box(arr)
        if box is not None and not np.array_equal(arr[box], np.round(arr[box])):
            raise KitsnetError(f"{case}: {path}: non-integer label value")
    return arr if arr.dtype == np.uint8 else np.asarray(arr, dtype=np.uint8, order="K")


def load_case_crop(case: str, fold: int, pred_path: Path, ref_path: Path) -> CaseCrop:
    """Load one prediction/reference pair, check its grid, and reduce it to a :class:`CaseCrop`.

    Raises :class:`KitsnetError` naming the case and the file for a missing or unreadable file, a
    grid (shape or spacing) that differs from the reference's, or a label outside 0-3.  The
    prediction is released before the reference is loaded, so one full volume is held at a time.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred_vol = load_volume(pred_path, case)
    pred = _as_labels(pred_vol.array, case, pred_path)
    order = memory_order(pred)
    pred_shape, pred_spacing = pred.shape, pred_vol.spacing
    box = foreground_box(pred.transpose(order), margin=1)
    if box is None:
        box = (slice(0, 0),) * 3
    pred_crop = compress(pred.transpose(order)[box])
    del pred_vol, pred
    ref_vol = load_volume(ref_path, case)
    if ref_vol.array.shape != pred_shape:
        raise KitsnetError(
            f"{case}: prediction {pred_path} has shape {pred_shape} but reference "
            f"{ref_path} has shape {ref_vol.array.shape}"
        )
    if not np.allclose(pred_spacing, ref_vol.spacing, rtol=0.0, atol=SPACING_ATOL_MM):
        raise KitsnetError(
            f"{case}: prediction {pred_path} has spacing {pred_spacing} mm but reference "
            f"{ref_path} has spacing {ref_vol.spacing} mm"
        )
    try:
        voxel_mm3 = voxel_volume(pred_spacing)
    except KitsnetError as exc:
        raise KitsnetError(f"{case}: {pred_path}: {exc}") from exc
    ref = _as_labels(ref_vol.array, case, ref_path).transpose(order)
    ref_box = foreground_box(ref)
    total = _region_counts(ref[ref_box]) if ref_box is not None else np.zeros(3, np.int64)
    ref_crop = ref[box]
    outside = total - _region_counts(ref_crop)
    return CaseCrop(
        case=case,
        fold=int(fold),
        shape=tuple(int(n) for n in ref_crop.shape),
        voxel_mm3=voxel_mm3,
        pred=pred_crop,
        ref=compress(ref_crop),
        ref_outside=tuple(int(n) for n in outside),  # type: ignore[arg-type]
        smallest_ref_mm3=smallest_component_mm3(ref, ref_vol.spacing),
    )


def crop_dice(pred: np.ndarray, ref: np.ndarray, ref_outside: Sequence[int]) -> list[float]:
    """Dice of kidney, masses and tumor from a crop and the reference voxels outside it.

    The prediction must be background outside the crop (true of :class:`CaseCrop`).  Counted
    slab by slab, so the masks never exist at the crop's full size.
    """
    counts = np.zeros((len(HEC_LABELS), 3), np.int64)  # predicted, reference, both
    for sl in slabs(pred.shape):
        for k, labels in enumerate(HEC_LABELS.values()):
            mp, mg = _region_mask(pred[sl], labels), _region_mask(ref[sl], labels)
            counts[k] += [np.count_nonzero(mp), np.count_nonzero(mg), np.count_nonzero(mp & mg)]
    out = []
    for (n_pred, n_ref, both), outside in zip(counts.tolist(), ref_outside, strict=True):
        n_ref += int(outside)
        if n_pred == 0 and n_ref == 0:
            out.append(1.0)
        elif n_pred == 0 or n_ref == 0:
            out.append(0.0)
        else:
            out.append(2.0 * both / float(n_pred + n_ref))
    return out
