"""KiTS21 evaluation: Dice and Surface Dice per hierarchical class, identical to the official code.

The definition is the one of the official kits21 repository (``kits21/configuration/labels.py``
and ``kits21/evaluation/metrics.py``):

* three hierarchical evaluation classes (HECs), each a union of labels: kidney = {1, 2, 3},
  masses = {2, 3}, tumor = {2};
* Dice per class, ``2|A∩B| / (|A| + |B|)``;
* Surface Dice per class at the class's tolerance in mm, computed with DeepMind's
  ``surface-distance`` package (see :mod:`kitsnet.evaluate.surface`);
* both masks empty: Dice 1 and Surface Dice 1; exactly one empty: Dice 0 and Surface Dice 0;
* the voxel spacing comes from the image header, in the array's axis order.

``tests/reference/kits21_official.py`` spells that code out literally on the whole volume; tests
and ``benchmarks/bench_evaluate.py`` compare against it.  :func:`score_arrays` computes the same
numbers much faster: one reduction over the slowest memory axis of each volume gives both the
label check and the extent of the foreground along that axis; a second reduction over that slab
only gives the other two extents.  Everything after that works on the bounding box of both label
maps.  (The official code builds each class mask on the whole volume, label by label, and counts
it several times: about 80% of its run time on KiTS21 volumes.)  Surface Dice itself is
:func:`kitsnet.evaluate.surface.surface_dice`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kitsnet.core.io import KitsnetError, load_volume

__all__ = [
    "HEC_LABELS",
    "SD_TOLERANCE_MM",
    "METRIC_COLUMNS",
    "as_metric_dict",
    "score_arrays",
    "score_case",
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

#: The six score columns, in the order every score table (CSV, report) uses.
METRIC_COLUMNS: list[str] = [
    "dice_kidney",
    "dice_masses",
    "dice_tumor",
    "sd_kidney",
    "sd_masses",
    "sd_tumor",
]

#: Largest label value allowed (0 background, 1 kidney, 2 tumor, 3 cyst).
MAX_LABEL = 3

#: Prediction and reference spacings must agree to this many mm.  NIfTI stores zooms as float32,
#: so files written from the same header agree exactly; anything larger is a different grid.
SPACING_ATOL_MM = 1e-5


def as_metric_dict(dice: dict[str, float], sdice: dict[str, float]) -> dict[str, float]:
    """Per-class Dice and Surface Dice as one flat row in :data:`METRIC_COLUMNS` order."""
    out = {f"dice_{name}": float(dice[name]) for name in HEC_LABELS}
    out.update({f"sd_{name}": float(sdice[name]) for name in HEC_LABELS})
    return {col: out[col] for col in METRIC_COLUMNS}


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
    """The metrics of label maps already checked by :func:`_label_profile`, on their crop."""
    # imported here: the report's environment reads METRIC_COLUMNS without surface-distance
    from kitsnet.evaluate.surface import surface_dice

    box = _foreground_box(pred, ref, axis, prof_pred, prof_ref)
    if box is None:  # nothing anywhere: every class is "both empty"
        return as_metric_dict(dict.fromkeys(HEC_LABELS, 1.0), dict.fromkeys(HEC_LABELS, 1.0))
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
            sdice[name] = surface_dice(mg, mp, spacing, SD_TOLERANCE_MM[name], perm)
    return as_metric_dict(dice, sdice)


def _normalise_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Three finite positive floats, or an error: a bad header would give silent nonsense."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise KitsnetError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def score_arrays(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The six KiTS21 metrics of one case, fast; equal to the official whole-volume computation.

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
