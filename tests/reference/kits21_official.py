"""The official KiTS21 metrics, literally, on the whole volume: the oracle for kitsnet.evaluate.

Mirrors ``compute_metrics_for_label`` / ``compute_metrics_for_case`` of the kits21 repository
(``kits21/evaluation/metrics.py``): whole-volume HEC masks built label by label, emptiness by
``np.sum``, medpy-style Dice, and ``compute_surface_distances`` +
``compute_surface_dice_at_tolerance`` of DeepMind's surface-distance package.  It is slow by
design; kitsnet's :func:`kitsnet.evaluate.metrics.score_arrays` must agree with it to 1e-9 (tests)
and is timed against it (``benchmarks/bench_evaluate.py``).

The classes, tolerances and column order are kitsnet's own constants (they are the KiTS21
values); the package runs through kitsnet's NumPy-2/SciPy compatibility shim, applied here
explicitly as the official code would need it too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import surface_distance

from kitsnet.core.io import KitsnetError, load_volume
from kitsnet.evaluate.metrics import HEC_LABELS, SD_TOLERANCE_MM, as_metric_dict
from kitsnet.evaluate.surface import patch_surface_distance

__all__ = ["reference_score_arrays", "reference_score_case"]

patch_surface_distance()


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
    in the arrays' axis order.  Slow by design; kitsnet's ``score_arrays`` is for real work.
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
    return as_metric_dict(dice, sdice)


def reference_score_case(
    case: str, pred_path: str | os.PathLike[str], ref_path: str | os.PathLike[str]
) -> dict:
    """:func:`reference_score_arrays` on two files, with the prediction's spacing like the
    official ``compute_metrics_for_case``; the oracle for tests and the benchmark."""
    pred = load_volume(pred_path, case)
    ref = load_volume(ref_path, case)
    return {"case": case, **reference_score_arrays(pred.array, ref.array, pred.spacing)}
