"""Benchmark ``sliding_window``: CPU sliding-window inference of one volume, kitsnet vs nnU-Net v2.

One seeded volume, one small 4-stage U-Net (nnU-Net's own network from the same arch, via
``tests.reference.nnunet_plans``, carries kitsnet's weights), as nnU-Net infers: step 0.5,
Gaussian weighting, mirroring over 3 axes.  kitsnet: ``predict_volume``; nnU-Net:
``predict_sliding_window_return_logits`` (float16 accumulation, as it really does).  ``check``:
the largest and 99th-percentile logit difference and the arg-max agreement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import peer_available as peer_available
from kitsnet.stages import NUM_CLASSES

NAME = "sliding_window"
GOAL = 1.3

FEATURES = [8, 16, 32, 64]
FULL = {"patch": [64, 64, 64], "shape": (128, 128, 128)}
QUICK = {"patch": [64, 64, 64], "shape": (64, 96, 96)}
INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": True}
ARCH = {"dim": 3, "features_per_stage": FEATURES, "kernel_sizes": [[3, 3, 3]] * len(FEATURES)}
ARCH.update(strides=[[1, 1, 1]] + [[2, 2, 2]] * (len(FEATURES) - 1), deep_supervision=False)
ARCH.update(n_conv_per_stage=2, n_conv_per_stage_decoder=2)

WHAT = (
    f"3D U-Net {'-'.join(map(str, FEATURES))} (4 stages, 2 convs each), volume "
    f"{'x'.join(map(str, FULL['shape']))} (27 tiles of 64^3), step 0.5, Gaussian, "
    "mirroring over 3 axes (8 passes/tile), CPU float32 logits"
)


def setup(quick: bool) -> dict[str, Any]:
    """The volume, kitsnet's network and (when nnU-Net is installed) its predictor."""
    import torch

    from kitsnet.model.network import build_network

    sizes = QUICK if quick else FULL
    torch.manual_seed(0)
    net = build_network(ARCH, 1, NUM_CLASSES).eval()
    image = np.random.default_rng(0).standard_normal((1, *sizes["shape"])).astype(np.float32)
    plan = {"num_classes": NUM_CLASSES, "patch_size": sizes["patch"], "arch": ARCH}
    inputs = {"net": net, "image": image, "plan": plan, "predictor": None}
    if peer_available() is None:
        inputs["predictor"] = _predictor(net, sizes["patch"])
    return inputs


def _predictor(net, patch: list[int]):
    """nnU-Net's predictor on the CPU with its own network carrying ``net``'s weights."""
    from tests.reference import nnunet_plans as ref

    network = ref.nnunet_network(ref.nnunet_architecture(ARCH), 1, NUM_CLASSES, False)
    ref.load_kitsnet_weights(network, net.state_dict())
    return ref.cpu_predictor(network.eval(), patch, INFERENCE)


def run_kitsnet(inputs: dict[str, Any]) -> np.ndarray:
    from kitsnet.predict.infer import predict_volume

    return predict_volume([inputs["net"]], inputs["image"], inputs["plan"], INFERENCE)


def run_peer(inputs: dict[str, Any]) -> np.ndarray:
    import torch

    image = torch.from_numpy(inputs["image"])
    return inputs["predictor"].predict_sliding_window_return_logits(image).float().numpy()


def check(quick: bool) -> dict[str, Any]:
    """Agreement of the two outputs on the quick inputs (one run of each)."""
    inputs = setup(True)
    ours, peer = run_kitsnet(inputs), run_peer(inputs)
    diff = np.abs(ours - peer)
    return {
        "shape": list(ours.shape),
        "max_abs_diff": float(diff.max()),
        "p99_abs_diff": float(np.quantile(diff, 0.99)),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float(np.mean(ours.argmax(0) == peer.argmax(0))),
    }
