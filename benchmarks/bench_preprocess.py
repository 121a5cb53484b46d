"""Preprocessing one CT case: CT normalisation + third-order resampling to both 3D grids.

A 200 x 512 x 512 case at 2.5 x 0.8 x 0.8 mm (anisotropic: in-plane cubic per slice, nearest
across slices) to the paper's 0.78 mm and 1.99 mm grids.  kitsnet: ``preprocess_image``;
nnU-Net: ``CTNormalization`` + its planner's default ``resample_data_or_seg_to_shape`` per
configuration, as ``DefaultPreprocessor`` does (labels are not part of this benchmark).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import FULLRES, LOWRES, kitsnet_plan
from benchmarks.common import peer_available as peer_available
from benchmarks.inputs import synthetic_case

NAME = "preprocess"
GOAL = 3.0
SPACING = [2.5, 0.8, 0.8]
WHAT = "normalise + resample a 200x512x512 CT (2.5x0.8x0.8 mm) to 0.78 mm and 1.99 mm grids"
PLANS = (kitsnet_plan("3d_fullres", FULLRES), kitsnet_plan("3d_lowres", LOWRES))


def setup(quick: bool) -> np.ndarray:
    return synthetic_case((100, 256, 256) if quick else (200, 512, 512))[0]


def run_kitsnet(image: np.ndarray) -> list[np.ndarray]:
    from kitsnet.preprocess.case import preprocess_image

    return [preprocess_image(image, SPACING, plan) for plan in PLANS]


def run_peer(image: np.ndarray) -> list[np.ndarray]:
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from tests.reference.nnunet_plans import plans_manager

    out = []
    for plan in PLANS:
        pm = plans_manager(plan)
        cm = pm.get_configuration(plan["configuration"])
        props = pm.foreground_intensity_properties_per_channel["0"]
        norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props)
        data = norm.run(image.copy())[None]  # per channel, as DefaultPreprocessor._normalize
        shape = compute_new_shape(image.shape, SPACING, plan["spacing"])
        out.append(cm.resampling_fn_data(data, shape, SPACING, plan["spacing"]))
    return out


def check(quick: bool) -> dict:
    """Largest difference of the two preprocessed images (z-scored units) on the same input."""
    image = setup(True)
    ours, ref = run_kitsnet(image), run_peer(image)
    diffs = [float(np.abs(o - r).max()) for o, r in zip(ours, ref, strict=True)]
    shapes_equal = all(o.shape == r.shape for o, r in zip(ours, ref, strict=True))
    out = {"max_abs_diff_fullres": diffs[0], "max_abs_diff_lowres": diffs[1]}
    return {**out, "shapes_equal": shapes_equal, "tolerance": 1e-4}
