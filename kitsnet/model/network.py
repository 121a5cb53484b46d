"""Plain-convolution U-Net for 2D and 3D, configured entirely from a plan's ``arch`` dict.

This mirrors nnU-Net v2's ``PlainConvUNet`` (``dynamic_network_architectures``) as the KiTS21
recipe instantiates it: conv (bias) -> InstanceNorm (affine) -> LeakyReLU blocks, strided
convolutions for downsampling, transposed convolutions for upsampling, and one 1x1 segmentation
head per decoder stage.  The module names follow nnU-Net's (``encoder.stages.{s}.0.convs.{i}.conv``,
``decoder.transpconvs.{s}``, ``decoder.seg_layers.{s}`` ...) so that the parameter count matches
exactly and an nnU-Net state dict can be loaded after dropping its aliased duplicate keys.

One class serves every configuration: the plan says how many stages, which strides and kernels,
and the network is built from that, so a new plan never needs a new subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "InstanceNorm3d",
    "PlainConvUNet",
    "build_network",
    "init_weights_he",
]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters, state-dict keys and maths) with a fast path for
    channels-last CPU inference.

    PyTorch's CPU instance norm runs as a batch norm over a (1, N*C, S) view, so a
    ``channels_last_3d`` input is first copied to contiguous and the result copied back to
    channels-last: two extra passes over every activation, which cancel most of what the
    channels-last convolutions (oneDNN, ~1.8x faster on the CPU) gain.  For such inputs, when
    no gradient is needed, the norm is computed directly on the (N, S, C) view that a
    channels-last tensor already is: two-pass per-channel statistics accumulated in float64
    (biased variance, as ``F.instance_norm``; see ``_channel_mean_var``), then one fused
    ``v * scale + shift`` pass written in channels-last layout.  Its error is the float32
    rounding of that last pass, on any CPU (the bound is tested); every
    other case (training, GPU, contiguous inputs, running statistics) calls ``F.instance_norm``
    exactly as the parent class does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return super().forward(x)
        n, c, d, h, w = x.shape
        v = x.permute(0, 2, 3, 4, 1).reshape(n, d * h * w, c)  # a view: no copy
        mean, var = _channel_mean_var(v)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        # Centre on the mean rounded to the input's dtype: v - m is exact for the voxels near
        # the mean (Sterbenz), so a channel of mean 100 and spread 1e-3 keeps its digits; the
        # float64 remainder (mean - m) goes into the shift.
        m = mean.to(x.dtype)
        shift = -(mean - m.to(mean.dtype)) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(shift.dtype)
        centred = v - m
        # one fused pass, into the centred buffer (channels-last, as the input)
        out = torch.addcmul(shift.to(x.dtype), centred, scale.to(x.dtype), out=centred)
        return out.view(n, d, h, w, c).permute(0, 4, 1, 2, 3)

    def _has_trainable(self) -> bool:
        return any(p.requires_grad for p in (self.weight, self.bias) if p is not None)

    def _fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes the fast path (see the class docstring for why only then)."""
        return (
            x.device.type == "cpu"
            and x.dim() == 5
            and x.dtype in (torch.float32, torch.float64)
            and not (self.track_running_stats and self.running_mean is not None)
            and not (torch.is_grad_enabled() and (x.requires_grad or self._has_trainable()))
            and x.is_contiguous(memory_format=torch.channels_last_3d)
            and not x.is_contiguous()
        )


# voxels x channels x batch per float64 block of _channel_mean_var: 16 MiB of float64 at a time
_STAT_BLOCK = 1 << 21


def _channel_mean_var(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``v`` (N, S, C), accumulated in float64.

    Why float64: a float32 reduction over S voxels is off by up to ~S * 2^-24 relative, and how
    far depends on the kernel's reduction order (sequential, blocked, SIMD width), i.e. on the
    CPU.  Summed in float64 the statistics are exact to ~S * 2^-53 (< 1e-9 for any 3D patch) on
    every CPU, so the only float32 error left is the rounding of the centring, of ``scale`` and
    ``shift`` and of the fused output pass: |error| <= 4 u (|x - mean| |scale| + |shift| +
    |out|), u = 2^-24 (derived in tests/unit/model/test_network.py, which checks it).
    Two passes (mean, then the centred squares) keep near-constant channels with a large mean
    (air in CT) exact, where E[x^2] - E[x]^2 would cancel.  Blocks of S bound the transient
    float64 copies to 16 MiB whatever the tile.
    """
    n, s, c = v.shape
    step = max(1, _STAT_BLOCK // max(1, n * c))
    total = v.new_zeros((n, 1, c), dtype=torch.float64)
    for start in range(0, s, step):
        total += v[:, start : start + step].sum(dim=1, keepdim=True, dtype=torch.float64)
    mean = total / s
    squares = torch.zeros_like(total)
    for start in range(0, s, step):
        centred = v[:, start : start + step].to(torch.float64) - mean
        squares += (centred * centred).sum(dim=1, keepdim=True)
    return mean, squares / s


_NORM = {2: nn.InstanceNorm2d, 3: InstanceNorm3d}


class ConvNormAct(nn.Module):
    """Conv -> InstanceNorm -> LeakyReLU, padded so that stride 1 keeps the spatial size."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
    ) -> None:
        super().__init__()
        padding = [(k - 1) // 2 for k in kernel_size]
        self.conv = _CONV[dim](
            in_channels, out_channels, tuple(kernel_size), tuple(stride), padding, bias=True
        )
        self.norm = _NORM[dim](out_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvBlocks(nn.Module):
    """``n`` conv blocks; only the first one carries the stride (strided-conv downsampling)."""

    def __init__(
        self,
        n: int,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        first_stride: Sequence[int],
    ) -> None:
        super().__init__()
        ones = [1] * dim
        self.convs = nn.Sequential(
            *[
                ConvNormAct(
                    dim,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size,
                    first_stride if i == 0 else ones,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainConvEncoder(nn.Module):
    """Encoder stages; returns every stage's output because the decoder needs them as skips."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        features: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv: Sequence[int],
    ) -> None:
        super().__init__()
        stages = []
        for s, width in enumerate(features):
            # nn.Sequential wrapper only to reproduce nnU-Net's key names (stages.{s}.0.convs...).
            block = StackedConvBlocks(
                n_conv[s], dim, in_channels, width, kernel_sizes[s], strides[s]
            )
            stages.append(nn.Sequential(block))
            in_channels = width
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Upsample, concatenate the skip, convolve; one seg head per stage (all built, always)."""

    def __init__(
        self,
        dim: int,
        features: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        n_enc = len(features)
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n_enc):
            below, skip = features[-s], features[-(s + 1)]
            stride = tuple(strides[-s])
            transpconvs.append(_TRANSPOSED[dim](below, skip, stride, stride, bias=True))
            ones = [1] * dim
            stages.append(
                StackedConvBlocks(n_conv[s - 1], dim, 2 * skip, skip, kernel_sizes[-(s + 1)], ones)
            )
            seg_layers.append(_CONV[dim](skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> list[torch.Tensor]:
        """Logits per decoder stage, highest resolution first (only the last one without DS)."""
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1]


class PlainConvUNet(nn.Module):
    """U-Net whose whole shape comes from its arguments (see :func:`build_network`).

    ``deep_supervision`` is a plain attribute: training sets it so that ``forward`` returns a
    list of logits (highest resolution first, one per decoder stage); inference clears it so
    that ``forward`` returns only the full-resolution logits tensor.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        n = len(features)
        for name, seq, want in (
            ("kernel_sizes", kernel_sizes, n),
            ("strides", strides, n),
            ("n_conv_per_stage", n_conv_per_stage, n),
            ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n - 1),
        ):
            if len(seq) != want:
                raise ValueError(f"{name} has {len(seq)} entries, expected {want} for {n} stages")
        for name, seq in (("kernel_sizes", kernel_sizes), ("strides", strides)):
            if any(len(v) != dim for v in seq):
                raise ValueError(f"every entry of {name} needs {dim} values, got {list(seq)}")
        self.dim = dim
        self.num_classes = num_classes
        self.strides = [tuple(int(v) for v in s) for s in strides]
        self.deep_supervision = deep_supervision
        self.encoder = PlainConvEncoder(
            dim, in_channels, features, kernel_sizes, strides, n_conv_per_stage
        )
        self.decoder = UNetDecoder(
            dim, features, kernel_sizes, strides, n_conv_per_stage_decoder, num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.decoder(self.encoder(x), self.deep_supervision)
        return outputs if self.deep_supervision else outputs[0]

    def output_strides(self) -> list[tuple[int, ...]]:
        """Cumulative downsampling of each deep-supervision output (the loss needs the scales)."""
        cumulative, current = [], [1] * self.dim
        for stride in self.strides[:-1]:
            current = [c * s for c, s in zip(current, stride, strict=True)]
            cumulative.append(tuple(current))
        return cumulative


def init_weights_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``: Kaiming-normal conv weights (leaky slope), zero biases.

    Norm layers keep PyTorch's defaults (weight 1, bias 0), as in nnU-Net.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _per_stage(value: int | Sequence[int], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries, expected {n}")
    return value


def build_network(arch: dict[str, Any], in_channels: int, num_classes: int) -> PlainConvUNet:
    """Build a U-Net from a plan's ``arch`` dict and initialise it like nnU-Net.

    Keys: ``dim`` (2 or 3), ``features_per_stage``, ``strides`` and ``kernel_sizes`` (one
    per stage, stage 0 stride is normally all ones), ``n_conv_per_stage`` and
    ``n_conv_per_stage_decoder`` (int or per-stage list; the decoder has one stage fewer) and
    ``deep_supervision`` (default True).

    The returned module accepts inputs in either contiguous or channels-last memory format;
    convert the module with ``model.to(memory_format=torch.channels_last_3d)`` for speed on GPU.
    """
    missing = {"dim", "features_per_stage", "strides", "kernel_sizes"} - set(arch)
    if missing:
        raise ValueError(f"arch is missing {sorted(missing)}")
    features = [int(f) for f in arch["features_per_stage"]]
    n = len(features)
    model = PlainConvUNet(
        dim=int(arch["dim"]),
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        kernel_sizes=[[int(k) for k in ks] for ks in arch["kernel_sizes"]],
        strides=[[int(s) for s in st] for st in arch["strides"]],
        n_conv_per_stage=_per_stage(arch.get("n_conv_per_stage", 2), n, "n_conv_per_stage"),
        n_conv_per_stage_decoder=_per_stage(
            arch.get("n_conv_per_stage_decoder", 2), n - 1, "n_conv_per_stage_decoder"
        ),
        deep_supervision=bool(arch.get("deep_supervision", True)),
    )
    model.apply(init_weights_he)
    return model
