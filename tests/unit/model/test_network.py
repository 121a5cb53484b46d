"""Shape, configuration and training-step checks for kitsnet.model.network (CPU, tiny configs)."""

from __future__ import annotations

import pytest
import torch

from kitsnet.model.network import InstanceNorm3d, PlainConvUNet, build_network
from kitsnet.plan.planner import features_per_stage


def _arch(dim: int, features: list[int], strides: list[list[int]], **extra) -> dict:
    return {
        "dim": dim,
        "features_per_stage": features,
        "strides": strides,
        "kernel_sizes": [[3] * dim] * len(features),
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
        "deep_supervision": True,
        **extra,
    }


ARCH_3D = _arch(3, [4, 8, 16], [[1, 1, 1], [2, 2, 2], [1, 2, 2]])
ARCH_2D = _arch(2, [4, 8, 16, 16], [[1, 1], [2, 2], [2, 2], [2, 2]])


def test_features_per_stage_rule() -> None:
    assert features_per_stage(30, 320, 5) == [30, 60, 120, 240, 320]
    # 2D KiTS plan: 512x512 patch, 7 stages, base 32 capped at 512 by nnU-Net's default.
    assert features_per_stage(32, 512, 7) == [32, 64, 128, 256, 512, 512, 512]
    assert features_per_stage(32, 480, 7) == [32, 64, 128, 256, 480, 480, 480]
    with pytest.raises(ValueError):
        features_per_stage(0, 320, 5)


def test_3d_deep_supervision_shapes() -> None:
    model = build_network(ARCH_3D, in_channels=1, num_classes=4)
    out = model(torch.randn(2, 1, 8, 16, 16))
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 4, 8, 16, 16)
    assert out[1].shape == (2, 4, 4, 8, 8)
    assert model.output_strides() == [(1, 1, 1), (2, 2, 2)]


def test_3d_anisotropic_stride_and_no_deep_supervision() -> None:
    model = build_network(ARCH_3D, in_channels=4, num_classes=4)
    model.deep_supervision = False
    out = model(torch.randn(1, 4, 8, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 8, 16, 16)
    model.deep_supervision = True
    assert len(model(torch.randn(1, 4, 8, 16, 16))) == 2


def test_2d_shapes() -> None:
    model = build_network(ARCH_2D, in_channels=1, num_classes=3)
    out = model(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    model.deep_supervision = False
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_deep_supervision_flag_from_arch() -> None:
    model = build_network({**ARCH_2D, "deep_supervision": False}, 1, 2)
    assert model.deep_supervision is False
    assert isinstance(model(torch.randn(1, 1, 16, 16)), torch.Tensor)


def test_all_seg_heads_built_and_per_stage_conv_counts() -> None:
    arch = {**ARCH_3D, "n_conv_per_stage": [1, 2, 3], "n_conv_per_stage_decoder": [1, 1]}
    model = build_network(arch, 1, 4)
    assert len(model.decoder.seg_layers) == 2
    assert [len(s[0].convs) for s in model.encoder.stages] == [1, 2, 3]
    assert [len(s.convs) for s in model.decoder.stages] == [1, 1]


def test_bad_arch_is_rejected() -> None:
    with pytest.raises(ValueError, match="strides"):
        build_network({**ARCH_3D, "strides": [[1, 1, 1], [2, 2, 2]]}, 1, 4)
    with pytest.raises(ValueError, match="dim"):
        build_network({**ARCH_3D, "dim": 4}, 1, 4)
    with pytest.raises(ValueError, match="missing"):
        build_network({"dim": 3}, 1, 4)


def test_he_init_zero_biases() -> None:
    model = build_network(ARCH_3D, 1, 4)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            assert torch.all(m.bias == 0)
            assert m.weight.std() > 0
        if isinstance(m, torch.nn.InstanceNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_network(ARCH_3D, 1, 4).eval()
    model.deep_supervision = False
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last_3d)
        out = model_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_channels_last_instance_norm_matches_the_exact_norm_in_inference() -> None:
    """CPU inference on channels-last inputs takes InstanceNorm3d's fast path (statistics on the
    (N, S, C) view, no layout copies).  Every norm's output on the network's real activations is
    within the float32 rounding bound of the float64 norm of the same input (the bound of
    test_channels_last_instance_norm_statistics_are_accurate), and the logits equal the
    default path's (F.instance_norm, float32 statistics) to 1e-5.  Training (gradients needed)
    keeps F.instance_norm."""
    torch.manual_seed(0)
    model = build_network(ARCH_3D, 2, 4).eval()
    model.deep_supervision = False
    norms = [m for m in model.modules() if isinstance(m, InstanceNorm3d)]
    with torch.no_grad():  # non-trivial affine parameters, so scale and shift both matter
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 2, 8, 16, 16) * 20 + 5  # far from zero mean / unit variance
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    fast = []

    def spy(m: InstanceNorm3d, args: tuple) -> None:
        fast.append(m._fast_path(args[0]))

    seen: list[tuple[InstanceNorm3d, torch.Tensor, torch.Tensor]] = []

    def record(m: InstanceNorm3d, args: tuple, out: torch.Tensor) -> None:
        seen.append((m, args[0].clone(), out.clone()))

    hooks = [m.register_forward_pre_hook(spy) for m in norms]
    with torch.inference_mode():
        ref = model(x)
        assert fast == [False] * len(norms)  # contiguous input: the exact norm throughout
        fast.clear()
        hooks += [m.register_forward_hook(record) for m in norms]
        out = model(x_cl)
    assert fast == [True] * len(norms)  # channels-last input: every norm took the fast path
    for m, inp, got in seen:
        error, bound = _norm_error_and_bound(inp, got, m.weight, m.bias)
        assert (error <= bound).all(), f"max error / bound {(error / bound).max().item():.2f}"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fast.clear()
    model.train()(x_cl).sum().backward()  # gradients needed: the exact norm again
    assert fast == [False] * len(norms)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (50.0, 3.0), (100.0, 1e-3), (-1000.0, 0.5)])
def test_channels_last_instance_norm_statistics_are_accurate(mean: float, std: float) -> None:
    """Large means and near-constant channels (air in CT) are where one-pass statistics
    (E[x^2] - E[x]^2) or long float32 sums drift, by an amount that depends on the CPU's
    reduction kernels.  The fast path sums in float64, so its error is bounded by the float32
    rounding of its last steps alone, whatever the CPU:

    - the statistics: float64 sums of S = 32^3 float32 values, relative error <= S 2^-53;
    - centring on m = fl32(mean): v - m is exact or off by u |v - m| (u = 2^-24);
    - scale = fl32(w / sqrt(var + eps)) (relative u) and shift = fl32(b - (mean - m) scale);
    - out = fl32(fl32(v - m) * scale + shift): u |(v - m) scale| + u |shift| + u |out|.

    Summed: |out - exact| <= 3u |v - mean| |scale| + u |shift| + u |out| + O(u^2); the test
    allows 4u of each term, element by element, and the bound itself never exceeds 1e-5 here
    (the test allowed 2e-5 of absolute error before)."""
    torch.manual_seed(0)
    norm = InstanceNorm3d(8, eps=1e-5, affine=True).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 32, 32, 32) * std + mean
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        assert norm._fast_path(x_cl)
        out = norm(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    error, bound = _norm_error_and_bound(x, out, norm.weight, norm.bias)
    assert (error <= bound).all(), f"max error / bound {(error / bound).max().item():.2f}"
    assert bound.max().item() < 1e-5


def _norm_error_and_bound(
    x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """|out - exact| against float64 instance_norm of ``x``, and the float32 rounding bound
    4u (|x - mean| |scale| + |shift| + |exact|) derived in the statistics test."""
    x64, w, b = x.double(), weight.double().view(1, -1, 1, 1, 1), bias.double()
    exact = torch.nn.functional.instance_norm(x64, weight=weight.double(), bias=b, eps=eps)
    u = 2.0**-24
    mean = x64.mean(dim=(2, 3, 4), keepdim=True)
    var = x64.var(dim=(2, 3, 4), keepdim=True, unbiased=False)
    scale = (w / torch.sqrt(var + eps)).abs()
    shift = b.view(1, -1, 1, 1, 1).abs() + u * mean.abs() * scale
    bound = 4 * u * ((x64 - mean).abs() * scale + shift + exact.abs())
    return (out.double() - exact).abs(), bound


def test_gradient_step_reduces_loss() -> None:
    torch.manual_seed(0)
    model: PlainConvUNet = build_network(ARCH_2D, 1, 2)
    x = torch.randn(2, 1, 16, 16)
    target = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = sum(
            torch.nn.functional.cross_entropy(o, target[:, :: 2**i, :: 2**i])
            for i, o in enumerate(model(x))
        )
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # A deep-supervised loss reaches every parameter, every seg head included.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("dim", "base", "cap", "n_stages", "in_channels", "expected"),
    [
        (3, 30, 320, 6, 1, 29_696_840),  # paper's 3D networks (low-res / full-res), 6 stages
        (3, 30, 320, 6, 4, 29_699_270),  # cascade: CT + 3 one-hot channels of the coarse stage
        (2, 30, 480, 8, 1, 40_720_708),  # paper's 2D network (512^2 patch, 8 stages)
    ],
)
def test_parameter_count_pinned_to_nnunet(
    dim: int, base: int, cap: int, n_stages: int, in_channels: int, expected: int
) -> None:
    """Counts verified equal to nnU-Net's PlainConvUNet (tests/nnunet/test_network_nnunet.py)."""
    arch = {
        "dim": dim,
        "features_per_stage": features_per_stage(base, cap, n_stages),
        "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
        "kernel_sizes": [[3] * dim] * n_stages,
    }
    model = build_network(arch, in_channels, 4)
    assert sum(p.numel() for p in model.parameters()) == expected
