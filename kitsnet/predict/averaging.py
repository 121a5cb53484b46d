"""Averaging compact probabilities: the arithmetic of an ensemble (nnU-Net's
``average_probabilities``, then its ``convert_probabilities_to_segmentation``).

Members of one kind average as nnU-Net does: class probabilities (softmax models) then the
arg-max; region probabilities (region-based models, :mod:`kitsnet.core.regions`) then each
region above 0.5 painted in ``regions_class_order``.  nnU-Net cannot ensemble a softmax model
with a region-based one; here such an ensemble averages region probabilities, a softmax
member's being the sum of its classes' (kidney = 1 - background, masses = tumor + cyst,
tumor), exact on the quantised values: so every pair of configurations can be scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kitsnet.core.regions import REGIONS, REGIONS_CLASS_ORDER, class_to_region_probabilities
from kitsnet.predict.probabilities import (
    CLASSES,
    REGIONS_KIND,
    Box,
    CompactProbabilities,
    _empty_box,
    quantise,
    quantise_regions,
)

__all__ = [
    "as_regions",
    "average",
    "ensemble",
    "ensemble_argmax",
    "ensemble_labels",
    "union_box",
]

Regions = Sequence[Sequence[int]]


def union_box(members: list[CompactProbabilities]) -> Box:
    """The smallest box holding every member's (non-empty) box."""
    boxes = [m.box for m in members if all(lo < hi for lo, hi in m.box)]
    if not boxes:
        return _empty_box(len(members[0].shape))
    return [
        [min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)] for a in range(len(boxes[0]))
    ]


def as_regions(cp: CompactProbabilities, regions: Regions = REGIONS) -> CompactProbabilities:
    """``cp`` as region probabilities: itself if it already is, else the sums of its classes
    (uint8, exact; outside the box every region is 0, as background 255 implies)."""
    if cp.kind == REGIONS_KIND:
        return cp
    q = class_to_region_probabilities(cp.q, regions)
    return CompactProbabilities(q, cp.box, tuple(cp.shape), REGIONS_KIND)


def _same_kind(members: list[CompactProbabilities]) -> list[CompactProbabilities]:
    """The members as they are when all are class probabilities, else all as regions."""
    if all(m.kind == CLASSES for m in members):
        return members
    return [as_regions(m) for m in members]


def _check_members(members: list[CompactProbabilities]) -> None:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    grids = {(m.kind, m.n_classes, tuple(m.shape)) for m in members}
    if len(grids) > 1:
        raise ValueError(f"members on different grids (kind, channels, shape): {sorted(grids)}")


def _mean(members: list[CompactProbabilities], box: Box) -> np.ndarray:
    """nnU-Net's ``average_probabilities`` over ``box``: float32 sum in member order, / n."""
    avg = members[0].region(box)
    for m in members[1:]:
        avg += m.region(box)
    avg /= np.float32(len(members))
    return avg


def average(members: list[CompactProbabilities]) -> tuple[Box, np.ndarray]:
    """The members' mean probabilities (float32) over the union of their boxes, and that box
    (outside it every member, and so the mean, is (1, 0, ..., 0), or 0 for regions).  Mixed
    kinds average as regions (:func:`as_regions`)."""
    members = _same_kind(members)
    _check_members(members)
    box = union_box(members)
    return box, _mean(members, box)


def ensemble_labels(
    members: list[CompactProbabilities],
    class_order: Sequence[int] = REGIONS_CLASS_ORDER,
    slab: int = 16,
) -> np.ndarray:
    """uint8 labels on the full grid from the members' mean probabilities: the arg-max
    (ties: the lowest class) of class probabilities, or for regions (any member
    region-based) each region whose mean is above 0.5 painted in ``class_order``; 0 outside
    the union of the boxes; ``slab`` planes at a time."""
    members = _same_kind(members)
    _check_members(members)
    regions = members[0].kind == REGIONS_KIND
    seg = np.zeros(members[0].shape, dtype=np.uint8)
    box = union_box(members)
    (b0, b1), rest = box[0], box[1:]
    for z0 in range(b0, b1, slab):
        z1 = min(z0 + slab, b1)
        part = [[z0, z1], *rest]
        mean = _mean(members, part)
        where = tuple(slice(lo, hi) for lo, hi in part)
        if not regions:
            seg[where] = mean.argmax(0)
            continue
        labels = np.zeros(mean.shape[1:], dtype=np.uint8)
        for i, label in enumerate(class_order):
            labels[mean[i] > 0.5] = label
        seg[where] = labels
    return seg


def ensemble_argmax(members: list[CompactProbabilities], slab: int = 16) -> np.ndarray:
    """uint8 labels on the full grid: arg-max (ties: the lowest class) of the members' mean
    q / 255 inside the union of their boxes, 0 outside; ``slab`` planes at a time (regions:
    see :func:`ensemble_labels`)."""
    return ensemble_labels(members, slab=slab)


def ensemble(members: list[CompactProbabilities]) -> tuple[np.ndarray, CompactProbabilities]:
    """The ensemble's labels and its mean probabilities in compact form (of the kind the
    members average in)."""
    seg = ensemble_labels(members)
    box, mean = average(members)
    kind = _same_kind(members)[0].kind
    q = quantise(mean) if kind == CLASSES else quantise_regions(mean)
    return seg, CompactProbabilities(q, box, tuple(members[0].shape), kind)
