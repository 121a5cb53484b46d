"""The KiTS regions, and how labels become regions and regions labels again.

Why: KiTS21 scores overlapping regions, not the labels: kidney = kidney + tumor + cyst (1, 2,
3), masses = tumor + cyst (2, 3), tumor (2).  nnU-Net v2's recipe for KiTS trains one sigmoid
output per region (its ``LabelManager`` with ``regions_class_order``) instead of a softmax over
the labels; a configuration named ``<configuration>_regions`` does that here
(:mod:`kitsnet.stages`).  Its plan holds the regions and their class order
(:func:`region_settings`), and every stage after the plan reads them from there.

Back to labels, nnU-Net's ``convert_probabilities_to_segmentation``: start from background and,
region by region in ``regions_class_order`` (1, 3, 2), give every voxel whose probability is
above 0.5 that label; so a voxel in all three regions ends as tumor (2), one in kidney and
masses but not tumor as cyst (3).  A probability above 0.5 is a logit above 0, which is how
the logits are thresholded here (the same voxels, without computing a sigmoid).

A softmax model's region probability is the sum of its classes' probabilities, which is how an
ensemble of a label-based and a region-based model is averaged
(:func:`class_to_region_probabilities`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "REGIONS",
    "REGION_NAMES",
    "REGIONS_CLASS_ORDER",
    "class_to_region_probabilities",
    "labels_to_regions",
    "output_channels",
    "plan_regions",
    "region_settings",
    "regions_to_labels",
]

# nnU-Net v2's KiTS dataset.json (Dataset220_KiTS2023): the labels of each region, in the
# order of the network's outputs, and the label each region paints, in that order
REGION_NAMES = ("kidney", "masses", "tumor")
REGIONS: tuple[tuple[int, ...], ...] = ((1, 2, 3), (2, 3), (2,))
REGIONS_CLASS_ORDER: tuple[int, ...] = (1, 3, 2)

Regions = Sequence[Sequence[int]]


def region_settings() -> dict:
    """The plan entries of a region-based configuration (plain lists, as JSON holds them)."""
    return {
        "regions": [list(r) for r in REGIONS],
        "region_names": list(REGION_NAMES),
        "regions_class_order": list(REGIONS_CLASS_ORDER),
    }


def plan_regions(plan: dict) -> tuple[list[list[int]], list[int]] | None:
    """(regions, regions_class_order) of a region-based plan; None for a label-based one
    (plans written before region-based training have neither key)."""
    if not plan.get("regions"):
        return None
    return [list(r) for r in plan["regions"]], list(plan["regions_class_order"])


def output_channels(plan: dict) -> int:
    """The network's outputs: one per region, or one per class (background included)."""
    regions = plan_regions(plan)
    return len(regions[0]) if regions else int(plan["num_classes"])


def labels_to_regions(seg: np.ndarray, regions: Regions) -> np.ndarray:
    """bool (R, *S): whether each voxel of label map ``seg`` (*S) lies in each region (nnU-Net's
    ``ConvertSegmentationToRegionsTransform``)."""
    seg = np.asarray(seg)
    return np.stack([np.isin(seg, list(r)) for r in regions])


def regions_to_labels(inside: np.ndarray, class_order: Sequence[int]) -> np.ndarray:
    """uint8 labels (*S) from bool (R, *S) region membership (probability > 0.5, logit > 0):
    region i paints label ``class_order[i]``, later regions over earlier ones."""
    seg = np.zeros(inside.shape[1:], dtype=np.uint8)
    for i, label in enumerate(class_order):
        seg[np.asarray(inside[i], dtype=bool)] = label
    return seg


def class_to_region_probabilities(q: np.ndarray, regions: Regions) -> np.ndarray:
    """Region probabilities (R, ...) of class probabilities ``q`` (C, ...): the sum of each
    region's classes.  uint8 in, uint8 out where ``q`` sums to at most 255 per voxel (the
    compact probabilities: the sum of quantised values stays exact)."""
    q = np.asarray(q)
    wide = np.int32 if q.dtype == np.uint8 else q.dtype
    out = np.stack([q[list(r)].sum(0, dtype=wide) for r in regions])
    return out.astype(q.dtype)
