"""Host memory of predicting and exporting the largest KiTS21 case (1059 x 512 x 796).

``kitsnet predict``'s path on the CPU from the image as read (float32, 0.5 x 0.8 x 0.8 mm) to
the label map written on the original grid: normalisation + resampling to 0.78 mm (678 x 524 x
815), sliding window (128^3, step 0.5, no mirroring), export with the compact probabilities
(as every prediction job writes them for the ensembles) and both files.  The network is one
1x1x1 convolution: what scales with the case (image, logits, weights, labels) does not depend
on it, and a U-Net on 960 tiles would take an hour on 2 cores.  Goal: peak RSS <= 16 GiB.  No
peer: nnU-Net's export is compared by the ``export`` benchmark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import FULLRES, kitsnet_plan
from benchmarks.inputs import synthetic_case
from kitsnet.stages import NUM_CLASSES

NAME = "memory"
GOAL = None
LIMIT_MB = 16 * 1024
MAX_RUNS = 1  # about 5 minutes on 2 cores; the peak does not vary between runs
SPACING = [0.5, 0.8, 0.8]
WHAT = "predict + export a 1059x512x796 CT (0.5x0.8x0.8 mm) at 0.78 mm, 1x1x1 conv net, peak RSS"
PLAN = {**kitsnet_plan("3d_fullres", FULLRES), "num_classes": NUM_CLASSES, "arch": {"dim": 3}}


def setup(quick: bool) -> dict:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, NUM_CLASSES, kernel_size=1).eval()
    shape = (264, 128, 200) if quick else (1059, 512, 796)
    return {"image": synthetic_case(shape)[0], "plan": PLAN, "net": net}


def run_kitsnet(inputs: dict) -> dict:
    from kitsnet.predict.infer import export_to_original, predict_volume, write_prediction
    from kitsnet.predict.probabilities import save_probabilities
    from kitsnet.preprocess.case import preprocess_image

    image, plan = inputs["image"], inputs["plan"]
    geometry = {"original_shape": list(image.shape), "original_spacing": SPACING}
    geometry.update(affine=np.diag([*SPACING[::-1], 1.0]).tolist(), sform_code=1, qform_code=1)
    pre = preprocess_image(image, SPACING, plan)
    inference = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": False}
    logits = predict_volume([inputs["net"]], pre, plan, inference, "cpu")
    del pre
    seg, probabilities = export_to_original(logits, geometry, plan)
    del logits
    with tempfile.TemporaryDirectory() as tmp:
        write_prediction(seg, geometry, Path(tmp) / "case.nii.gz")
        save_probabilities(Path(tmp) / "case.npz", probabilities)
        npz = (Path(tmp) / "case.npz").stat().st_size
    return {"shape": seg.shape, "probabilities_bytes": npz}
