"""Apply decided postprocessing steps to a label map: the one code path for every caller.

The workflow's postprocessing job, the decision (on crops) and ``kitsnet predict`` all go through
:func:`apply_to_crop`, so a prediction postprocessed anywhere is the one the decision scored.
:func:`apply_steps` is the full-volume entry point: it crops to the foreground's bounding box
(every step only removes connected components, which cannot leave that box), runs the steps there
and writes the crop back into a copy of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kitsnet.core.io import KitsnetError
from kitsnet.postprocess.candidates import STEPS
from kitsnet.postprocess.components import foreground_box, memory_order

__all__ = ["apply_steps", "apply_to_crop", "check_steps", "voxel_volume"]


def voxel_volume(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mm3; spacing must be three positive numbers."""
    values = [float(s) for s in spacing]
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise KitsnetError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return float(np.prod(values))


def check_steps(steps: Sequence[str], min_volume_mm3: float | None) -> list[str]:
    """The steps as a list, or a :class:`KitsnetError` naming an unknown step.

    ``kidney_min_volume`` needs a positive ``min_volume_mm3``: a decision JSON that lists the step
    without its threshold is broken, and silently skipping the step would change predictions.
    """
    steps = list(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise KitsnetError(f"unknown postprocessing step(s) {unknown}; known: {', '.join(STEPS)}")
    if "kidney_min_volume" in steps and not (
        min_volume_mm3 is not None and np.isfinite(min_volume_mm3) and min_volume_mm3 > 0
    ):
        raise KitsnetError(
            f"postprocessing step kidney_min_volume needs a positive min_volume_mm3, "
            f"got {min_volume_mm3!r}"
        )
    return steps


def apply_to_crop(
    crop: np.ndarray, voxel_mm3: float, steps: Sequence[str], min_volume_mm3: float | None
) -> bool:
    """Run ``steps`` in order on a uint8 crop, in place; returns whether any voxel changed."""
    changed = False
    for name in steps:
        changed |= bool(STEPS[name](crop, voxel_mm3, min_volume_mm3))
    return changed


def apply_steps(
    seg: np.ndarray,
    spacing: Sequence[float],
    steps: Sequence[str],
    min_volume_mm3: float | None,
) -> np.ndarray:
    """``seg`` (labels 0..3) after ``steps`` in order, as a new uint8 array in ``seg``'s layout.

    ``spacing`` is in ``seg``'s axis order (only the voxel volume is used).  The input is not
    modified.  Memory: one copy of ``seg`` plus about 4 bytes per voxel of the foreground's
    bounding box (mask and uint16 labels), so a 1059 x 512 x 796 case fits in well under 4 GB.
    """
    steps = check_steps(steps, min_volume_mm3)
    voxel_mm3 = voxel_volume(spacing)
    if seg.ndim != 3:
        raise KitsnetError(f"expected a 3D label map, got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise KitsnetError(f"label map must hold integer labels 0-3, got dtype {seg.dtype}")
    if seg.size:
        low = int(seg.min()) if np.issubdtype(seg.dtype, np.signedinteger) else 0
        high = int(seg.max())
        if low < 0 or high > 3:
            raise KitsnetError(f"label map holds label {low if low < 0 else high} outside 0-3")
    out = np.array(seg, dtype=np.uint8, order="K", copy=True)
    order = memory_order(out)
    view = out.transpose(order)
    box = foreground_box(view)
    if box is None or not steps:
        return out
    crop = np.ascontiguousarray(view[box])
    if apply_to_crop(crop, voxel_mm3, steps, min_volume_mm3):
        view[box] = crop
    return out
