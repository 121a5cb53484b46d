"""Benchmark ``sliding_window``: CPU sliding-window inference of one volume, kitsnet vs nnU-Net v2.

Both sides predict the logits of the same seeded random volume with the same network weights,
as nnU-Net's inference does it: tiles at a step of 0.5 x patch, Gaussian importance weighting
(sigma = patch / 8), test-time mirroring over all 3 axes (8 forward passes per tile), on the
CPU, float32 logits out.

- The network: a 4-stage 3D U-Net from ``kitsnet.network.build_network`` (widths 8-16-32-64,
  two convolutions per stage, stride 2, He-initialised with a fixed seed), narrower and
  shallower than the paper's so that a run takes tens of seconds on 2 cores.  nnU-Net gets its
  own ``PlainConvUNet`` (``get_network_from_plans``, as its trainer builds it, from the same
  arch translated into its plans' ``architecture`` entry, as ``tests/test_network_nnunet.py``
  does) with kitsnet's state dict loaded into it, so both compute the same function.
- kitsnet: :func:`kitsnet.infer.predict_volume` with its defaults (``tile_batch`` included).
- nnU-Net: ``nnUNetPredictor.predict_sliding_window_return_logits`` (the call its
  ``predict_logits_from_preprocessed_data`` makes per fold), configured as in
  ``tests/test_infer_nnunet.py``: device CPU, step 0.5, Gaussian, mirroring on, everything
  else its defaults (except ``allow_tqdm=False``: no progress bar on stderr).  It accumulates
  in float16, as it really does; its half logits are returned as a float32 array like
  kitsnet's (the conversion is inside the timed call; it takes milliseconds).

Threads: the harness sets both sides' torch thread count.  ``predict_sliding_window_return_logits``
does not change it (only ``predict_logits_from_preprocessed_data`` caps it at
``default_num_processes``, 8, and restores it afterwards), so both run with the same count.

``check`` runs both on the quick inputs in one process: the largest and the 99th-percentile
absolute logit difference (nnU-Net's float16 accumulation bounds the agreement, see
``tests/test_infer_nnunet.py``) and the fraction of voxels with the same arg-max.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import nnunet_architecture

NAME = "sliding_window"
GOAL = 1.3

FEATURES = [8, 16, 32, 64]
NUM_CLASSES = 4
FULL = {"patch": [64, 64, 64], "shape": (128, 128, 128)}
QUICK = {"patch": [64, 64, 64], "shape": (64, 96, 96)}
INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": True}
LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}

WHAT = (
    f"3D U-Net {'-'.join(map(str, FEATURES))} (4 stages, 2 convs each), volume "
    f"{'x'.join(map(str, FULL['shape']))} (27 tiles of 64^3), step 0.5, Gaussian, "
    "mirroring over 3 axes (8 passes/tile), CPU float32 logits"
)


def _arch() -> dict[str, Any]:
    n = len(FEATURES)
    return {
        "dim": 3,
        "features_per_stage": FEATURES,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "kernel_sizes": [[3, 3, 3]] * n,
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
        "deep_supervision": False,
    }


def _nnunet_network(arch: dict[str, Any]):
    """nnU-Net's own network for ``arch`` (its planner's ``architecture`` entry, translated)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = nnunet_architecture(arch)
    return get_network_from_plans(
        a["network_class_name"],
        a["arch_kwargs"],
        a["_kw_requires_import"],
        1,
        NUM_CLASSES,
        allow_init=True,
        deep_supervision=False,
    )


def setup(quick: bool) -> dict[str, Any]:
    """The volume, kitsnet's network and (when nnU-Net is installed) its predictor."""
    import torch

    from kitsnet.network import build_network

    sizes = QUICK if quick else FULL
    arch = _arch()
    torch.manual_seed(0)
    net = build_network(arch, 1, NUM_CLASSES).eval()
    image = np.random.default_rng(0).standard_normal((1, *sizes["shape"])).astype(np.float32)
    plan = {"num_classes": NUM_CLASSES, "patch_size": sizes["patch"], "arch": arch}
    inputs = {"net": net, "image": image, "plan": plan, "predictor": None}
    if peer_available() is None:
        inputs["predictor"] = _predictor(net, sizes["patch"])
    return inputs


def _predictor(net, patch: list[int]):
    """nnU-Net's predictor on the CPU with its own network carrying ``net``'s weights."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    ref = _nnunet_network(_arch())
    missing, unexpected = ref.load_state_dict(net.state_dict(), strict=False)
    # nnU-Net registers each layer twice (``all_modules`` and ``decoder.encoder`` aliases of the
    # same tensors); everything else must have been loaded.
    left = [k for k in missing if "all_modules" not in k and not k.startswith("decoder.encoder.")]
    assert not left and not unexpected, (left, unexpected)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,  # what it switches to on a CPU device anyway
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.network = ref.eval()
    predictor.configuration_manager = ConfigurationManager(
        {"patch_size": list(patch), "architecture": {}}
    )
    predictor.label_manager = LabelManager(LABELS, None)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    return predictor


def run_kitsnet(inputs: dict[str, Any]) -> np.ndarray:
    from kitsnet.infer import predict_volume

    return predict_volume([inputs["net"]], inputs["image"], inputs["plan"], INFERENCE)


def run_peer(inputs: dict[str, Any]) -> np.ndarray:
    import torch

    logits = inputs["predictor"].predict_sliding_window_return_logits(
        torch.from_numpy(inputs["image"])
    )
    return logits.float().numpy()


def peer_available() -> str | None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 is not installed ({exc}); pip install -e '.[peer]'"
    return None


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
