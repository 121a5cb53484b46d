"""Export: logits on the 0.78 mm fullres grid resampled to the original grid and arg-maxed.

Logits (4, 400, 512, 512) float32 (a large case, 1.6 GiB) back to its original (250, 500, 500)
grid at 1.25 x 0.8 x 0.8 mm (linear in all three axes).  kitsnet: ``logits_to_original``;
nnU-Net: ``convert_predicted_logits_to_segmentation_with_correct_shape`` with its planner's
default probability resampling and the same thread count.  Writing the NIfTI is not timed.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from benchmarks.common import FULLRES, kitsnet_plan
from benchmarks.common import peer_available as peer_available

NAME = "export"
GOAL = 3.0
ORIGINAL_SPACING = [1.25, 0.8, 0.8]
WHAT = "logits (4,400,512,512) at 0.78 mm -> (250,500,500) at 1.25x0.8x0.8 mm, linear + arg-max"
PLAN = kitsnet_plan("3d_fullres", FULLRES)


def setup(quick: bool) -> dict:
    """Smooth random logits (so the arg-max has realistic regions) and the original grid."""
    shape = (100, 128, 128) if quick else (400, 512, 512)
    rng = np.random.default_rng(0)
    small = [s // 8 for s in shape]
    logits = np.empty((4, *shape), dtype=np.float32)
    for c in range(4):
        coarse = ndimage.gaussian_filter(rng.standard_normal(small), 1.0).astype(np.float32)
        ndimage.zoom(coarse, [s / m for s, m in zip(shape, small, strict=True)], logits[c], order=1)
    original = [round(s * f / o) for s, f, o in zip(shape, FULLRES, ORIGINAL_SPACING, strict=True)]
    return {"logits": logits, "original_shape": original}


def run_kitsnet(inputs: dict) -> np.ndarray:
    from kitsnet.predict.infer import logits_to_original

    geometry = {"original_shape": inputs["original_shape"], "original_spacing": ORIGINAL_SPACING}
    return logits_to_original(inputs["logits"], geometry, PLAN)


def run_peer(inputs: dict) -> np.ndarray:
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    from tests.reference.nnunet_plans import dataset_json, plans_manager

    pm = plans_manager(PLAN)
    shape = list(inputs["original_shape"])
    props = {"spacing": ORIGINAL_SPACING, "bbox_used_for_cropping": [[0, s] for s in shape]}
    props.update(shape_after_cropping_and_before_resampling=shape, shape_before_cropping=shape)
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        inputs["logits"],
        pm,
        pm.get_configuration(PLAN["configuration"]),
        pm.get_label_manager(dataset_json()),
        props,
        num_threads_torch=int(os.environ.get("KITSNET_THREADS", os.cpu_count() or 1)),
    )


def check(quick: bool) -> dict:
    """Voxel agreement of the two label maps on the same (quick) logits."""
    inputs = setup(True)
    ours, ref = run_kitsnet(inputs), run_peer(inputs)
    return {
        "label_agreement": float((ours == ref).mean()),
        "differing_voxels": int((ours != ref).sum()),
        "shape_equal": ours.shape == ref.shape,
    }
