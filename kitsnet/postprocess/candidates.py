"""The candidate postprocessing steps and the minimum volume learned from the references.

Each step works in place on a uint8 label map (0 background, 1 kidney, 2 tumor, 3 cyst; in
practice the crop to the foreground's bounding box, see :mod:`kitsnet.postprocess.apply`) and
only ever sets voxels to background.  The "kidney region" is KiTS21's first hierarchical class,
labels > 0.  Components are 26-connected (:mod:`kitsnet.postprocess.components`).

nnU-Net's two candidates (``remove_all_but_largest_component_from_segmentation``):

* ``foreground_largest``: keep the largest component of labels > 0.  On KiTS this deletes one of
  the two kidneys of nearly every patient; it is offered because nnU-Net offers it, and the
  decision rejects it whenever the references have two kidneys.
* ``label_largest_1/2/3``: keep the largest component of that label; the label's other
  components become background.

KiTS-aware candidates:

* ``kidney_min_volume``: drop kidney-region components smaller than ``min_volume_mm3``.
* ``masses_on_kidney``: drop kidney-region components without a single kidney (label 1) voxel:
  a tumor or cyst floating away from every kidney is a false positive.
* ``kidney_two_largest``: keep the two largest kidney-region components (two kidneys).

Ties are kept as nnU-Net keeps them: its filter keeps every component whose size equals the
maximum, so "largest" here keeps every component of the largest size, and "two largest" every
component at least as large as the second largest.

``min_volume_mm3`` is learned by :func:`learn_min_volume`: half of the smallest kidney over the
references the decision sees, a kidney being one of a reference's two largest kidney-region
components that holds at least ``KIDNEY_FRACTION`` of the largest one's volume (a solitary
kidney after nephrectomy has no second one).  Why not the smallest component of any kind: the
real KiTS21 references hold stray components of 0.4-44 mm3, some a single voxel (7 of 12 cases
measured), which would make the threshold smaller than a voxel and the step a no-op.  Half the
smallest true kidney (about 69,000 mm3 on those 12) removes only what is far smaller than any
kidney the folds contain; whether that helps is the decision's to judge, like every candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kitsnet.postprocess.components import (
    clear_components,
    component_counts,
    foreground_box,
    label_components,
    memory_order,
)

__all__ = [
    "CANDIDATES",
    "STEPS",
    "kidney_min_volume",
    "masses_on_kidney",
    "kidney_two_largest",
    "foreground_largest",
    "keep_largest_of_label",
    "smallest_component_mm3",
    "learn_min_volume",
]

#: Signature of a step: ``(seg, voxel_mm3, min_volume_mm3) -> changed``, editing ``seg`` in place.
Step = Callable[[np.ndarray, float, "float | None"], bool]


def _kidney_components(seg: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Components of the kidney region (labels > 0): labels, count and voxels per label."""
    labels, count = label_components(seg > 0)
    return labels, count, component_counts(labels, count)


def kidney_min_volume(seg: np.ndarray, voxel_mm3: float, min_volume_mm3: float | None) -> bool:
    """Drop kidney-region components whose volume is below ``min_volume_mm3``."""
    if min_volume_mm3 is None:
        raise ValueError("kidney_min_volume needs min_volume_mm3")
    labels, _, sizes = _kidney_components(seg)
    return clear_components(seg, labels, sizes * float(voxel_mm3) < float(min_volume_mm3))


def masses_on_kidney(seg: np.ndarray, voxel_mm3: float, min_volume_mm3: float | None) -> bool:
    """Drop kidney-region components that contain no kidney (label 1) voxel."""
    labels, count = label_components(seg > 0)
    kidney_voxels = component_counts(labels, count, where=seg == 1)
    return clear_components(seg, labels, kidney_voxels == 0)


def kidney_two_largest(seg: np.ndarray, voxel_mm3: float, min_volume_mm3: float | None) -> bool:
    """Keep the two largest kidney-region components (and any tied with the second)."""
    labels, count, sizes = _kidney_components(seg)
    if count <= 2:
        return False
    second = np.sort(sizes[1:])[-2]
    return clear_components(seg, labels, sizes < second)


def _keep_largest(seg: np.ndarray, mask: np.ndarray) -> bool:
    """Keep the largest component(s) of ``mask``; set ``seg`` to 0 on the other components."""
    labels, count = label_components(mask)
    if count <= 1:
        return False
    sizes = component_counts(labels, count)
    return clear_components(seg, labels, sizes < sizes[1:].max())


def foreground_largest(seg: np.ndarray, voxel_mm3: float, min_volume_mm3: float | None) -> bool:
    """nnU-Net's: keep the largest component of labels > 0 (deletes a second kidney)."""
    return _keep_largest(seg, seg > 0)


def keep_largest_of_label(label: int) -> Step:
    """nnU-Net's per-label step: keep the largest component of ``label``, clear its others."""

    def step(seg: np.ndarray, voxel_mm3: float, min_volume_mm3: float | None) -> bool:
        return _keep_largest(seg, seg == label)

    step.__name__ = f"label_largest_{label}"
    step.__doc__ = f"Keep the largest component of label {label}; its other components -> 0."
    return step


#: Every step by name, in the order the decision tries them.
STEPS: dict[str, Step] = {
    "kidney_min_volume": kidney_min_volume,
    "masses_on_kidney": masses_on_kidney,
    "kidney_two_largest": kidney_two_largest,
    "foreground_largest": foreground_largest,
    "label_largest_1": keep_largest_of_label(1),
    "label_largest_2": keep_largest_of_label(2),
    "label_largest_3": keep_largest_of_label(3),
}

#: The candidates, in the order the greedy decision tries them.
CANDIDATES: tuple[str, ...] = tuple(STEPS)


#: A reference component counts as a kidney if it is one of the two largest and holds at least
#: this fraction of the largest one's volume.
KIDNEY_FRACTION = 0.1


def smallest_component_mm3(ref: np.ndarray, spacing: Sequence[float]) -> float | None:
    """Volume (mm3) of the smallest kidney of a reference (see the module docstring); ``None``
    if the reference is empty.

    Works on the reference's own foreground box, in memory order (see
    :mod:`kitsnet.postprocess.components`).
    """
    view = ref.transpose(memory_order(ref))
    box = foreground_box(view)
    if box is None:
        return None
    _, _, sizes = _kidney_components(np.ascontiguousarray(view[box]))
    top = np.sort(sizes[1:])[::-1][:2]
    kidneys = top[top >= KIDNEY_FRACTION * top[0]]
    return float(kidneys.min()) * float(np.prod([float(s) for s in spacing]))


def learn_min_volume(smallest: Sequence[float | None]) -> float | None:
    """Half of the smallest reference kidney volume (see the module docstring for why).

    ``smallest`` holds :func:`smallest_component_mm3` of each reference; ``None`` when no
    reference has any foreground (then ``kidney_min_volume`` cannot be decided and is skipped).
    """
    known = [float(v) for v in smallest if v is not None]
    return 0.5 * min(known) if known else None
