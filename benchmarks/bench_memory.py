"""Host memory of predicting and exporting the largest KiTS21 case (1059 x 512 x 796).

The whole inference path of ``kitsnet predict`` on the CPU, from the image array as read from
the NIfTI (float32, 0.5 x 0.8 x 0.8 mm) to the label map written back on the original grid:
CT normalisation + resampling to the 0.78 mm fullres grid (678 x 524 x 815), sliding window
(patch 128^3, step 0.5, Gaussian, no mirroring), export (linear resampling of the logits +
arg-max) and writing the NIfTI.  The network is a single 1x1x1 convolution (1 -> 4 channels)
because this measures memory, not compute (a U-Net on 960 tiles would take an hour on 2 CPU
cores): the arrays that scale with the case size (image, logits, Gaussian weights, labels) do
not depend on the network; the paper's U-Net adds the activations of one 128^3 tile batch.
Goal: peak resident memory <= 16 GiB.  No peer: nnU-Net's export is compared, at a smaller
size, by the ``export`` benchmark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import FULLRES, ct_volume, kitsnet_plan

NAME = "memory"
GOAL = None
LIMIT_MB = 16 * 1024
MAX_RUNS = 1  # about 5 minutes on 2 cores; the peak does not vary between runs
SPACING = [0.5, 0.8, 0.8]
WHAT = "predict + export a 1059x512x796 CT (0.5x0.8x0.8 mm) at 0.78 mm, 1x1x1 conv net, peak RSS"


def skip_reason() -> str | None:
    return None


def _plan() -> dict:
    plan = kitsnet_plan(FULLRES)
    plan.update({"num_classes": 4, "patch_size": [128, 128, 128], "arch": {"dim": 3}})
    return plan


def setup(quick: bool) -> dict:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 4, kernel_size=1).eval()
    shape = (264, 128, 200) if quick else (1059, 512, 796)
    return {"image": ct_volume(shape), "plan": _plan(), "net": net}


def run_kitsnet(inputs: dict) -> dict:
    from kitsnet.infer import logits_to_original, predict_volume, write_prediction
    from kitsnet.preprocess import preprocess_image

    image, plan = inputs["image"], inputs["plan"]
    affine = np.diag([*SPACING[::-1], 1.0])
    geometry = {
        "original_shape": list(image.shape),
        "original_spacing": SPACING,
        "affine": affine.tolist(),
        "sform_code": 1,
        "qform_code": 1,
    }
    pre = preprocess_image(image, SPACING, plan)
    inference = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": False}
    logits = predict_volume([inputs["net"]], pre, plan, inference, "cpu")
    del pre
    seg = logits_to_original(logits, geometry, plan)
    del logits
    with tempfile.TemporaryDirectory() as tmp:
        write_prediction(seg, geometry, Path(tmp) / "case.nii.gz")
    return {"shape": seg.shape}

