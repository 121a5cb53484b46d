"""kitsnet.network against nnU-Net's own PlainConvUNet (needs dynamic_network_architectures).

Skipped in the project's venv; runs in a peer venv that has nnU-Net installed, e.g.
``pip install torch==2.13.0 nnunetv2==2.8.1 torchvision==0.28.0 pytest`` then
``PYTHONPATH=. pytest tests/test_network_nnunet.py``.  Beyond equal parameter counts, it loads
nnU-Net's state dict into our network and checks that both compute the same logits.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "dynamic_network_architectures",
    reason="nnU-Net's dynamic_network_architectures is only installed in the peer venv",
)
from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402

from kitsnet.network import build_network, features_per_stage  # noqa: E402

CONFIGS = {
    # The paper's 3D full-resolution / cascade network: 5 stages 30..320, isotropic stride 2.
    "3d": {
        "dim": 3,
        "features_per_stage": features_per_stage(30, 320, 5),
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
        "kernel_sizes": [[3, 3, 3]] * 5,
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
        "deep_supervision": True,
    },
    # nnU-Net's KiTS 2D plan: 7 stages 32..512 for a 512x512 patch.
    "2d": {
        "dim": 2,
        "features_per_stage": features_per_stage(32, 512, 7),
        "strides": [[1, 1]] + [[2, 2]] * 6,
        "kernel_sizes": [[3, 3]] * 7,
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
        "deep_supervision": True,
    },
}
INPUT_SHAPE = {"3d": (1, 32, 32, 32), "2d": (1, 128, 128)}


def _nnunet(arch: dict, in_channels: int, num_classes: int) -> PlainConvUNet:
    """Instantiate PlainConvUNet exactly as nnU-Net's plans do for KiTS (conv_bias, IN, LReLU)."""
    dim = arch["dim"]
    n = len(arch["features_per_stage"])
    net = PlainConvUNet(
        input_channels=in_channels,
        n_stages=n,
        features_per_stage=arch["features_per_stage"],
        conv_op=torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d,
        kernel_sizes=arch["kernel_sizes"],
        strides=arch["strides"],
        n_conv_per_stage=[arch["n_conv_per_stage"]] * n,
        num_classes=num_classes,
        n_conv_per_stage_decoder=[arch["n_conv_per_stage_decoder"]] * (n - 1),
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=arch["deep_supervision"],
    )
    net.apply(net.initialize)
    return net


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "in_channels", "num_classes"),
    [("3d", 1, 4), ("3d", 4, 4), ("2d", 1, 4)],  # 4 inputs: CT + one-hot of the coarse stage
)
def test_parameter_count_and_outputs_match_nnunet(
    name: str, in_channels: int, num_classes: int
) -> None:
    arch = CONFIGS[name]
    torch.manual_seed(0)
    ref = _nnunet(arch, in_channels, num_classes).eval()
    ours = build_network(arch, in_channels, num_classes).eval()
    assert _n_params(ours) == _n_params(ref)

    # nnU-Net registers each layer twice (``all_modules`` and ``decoder.encoder`` aliases);
    # the remaining keys must be exactly ours.
    state = {
        k: v
        for k, v in ref.state_dict().items()
        if "all_modules" not in k and not k.startswith("decoder.encoder.")
    }
    ours.load_state_dict(state, strict=True)

    x = torch.randn(2, in_channels, *INPUT_SHAPE[name][1:])
    with torch.no_grad():
        for ds in (True, False):
            ref.decoder.deep_supervision = ds
            ours.deep_supervision = ds
            expected, got = ref(x), ours(x)
            if not ds:
                # nnU-Net returns a bare tensor without deep supervision as well.
                expected, got = [expected], [got]
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e)


def test_pinned_counts_in_test_network_are_nnunets() -> None:
    """tests/test_network.py pins these counts for CI runs that lack nnU-Net; keep them true."""
    expected = {("3d", 1): 15_048_196, ("3d", 4): 15_050_626, ("2d", 1): 33_474_840}
    for (name, in_channels), count in expected.items():
        assert _n_params(_nnunet(CONFIGS[name], in_channels, 4)) == count
