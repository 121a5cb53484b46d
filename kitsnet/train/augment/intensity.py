"""nnU-Net's intensity transforms: noise, blur, brightness, contrast, low resolution, gamma.

Every transform works in place on one sample (or one channel) at a time: nnU-Net's
probabilities pick few samples per transform, and a view of the chosen one costs nothing,
where gathering the chosen samples (``x[idx]``) and scattering them back copies twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kitsnet.train.augment.draws import _bg_contrast, _device_generator, _rand, _uniform

# nnU-Net applies blur, low resolution to each channel of a chosen sample with this probability.
_P_PER_CHANNEL_BLUR = 0.5
_P_PER_CHANNEL_LOWRES = 0.5


def _round_to_nearest_odd(v: float) -> int:
    """nnU-Net's kernel-size rule for its Gaussian blur."""
    r = round(v)
    if r % 2 == 1:
        return r
    return r + 1 if v - r >= 0 else r - 1


def _gaussian_kernel(sigma: float) -> list[float]:
    """nnU-Net's normalised Gaussian taps 0..h for ``sigma`` (the kernel is symmetric)."""
    h = _round_to_nearest_odd(sigma * 6 + 0.5) // 2
    taps = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(h + 1)]
    total = taps[0] + 2 * sum(taps[1:])
    return [t / total for t in taps]


def _blur_axis(v: Tensor, sigma: float, axis: int) -> Tensor:
    """1D Gaussian blur of one volume ``v`` (*S) along ``axis`` with reflect padding.

    A weighted sum of shifted views of the padded volume, pairing the symmetric taps: with the
    at most seven taps of nnU-Net's sigmas this is several times faster on a CPU core than a
    (grouped) convolution with a 1D kernel, and runs unchanged on GPU.
    """
    taps = _gaussian_kernel(sigma)
    h, n, dim = len(taps) - 1, v.shape[axis], v.ndim
    if h == 0:
        return v.clone()
    pad = [0, 0] * dim
    pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = h  # F.pad lists last axis first
    padded = F.pad(v[None, None], pad, mode="reflect")[0, 0]
    out = padded.narrow(axis, h, n) * taps[0]
    for t in range(1, h + 1):
        pair = padded.narrow(axis, h + t, n) + padded.narrow(axis, h - t, n)
        out.add_(pair, alpha=taps[t])
    return out


def _blur_channel(v: Tensor, sigma: Sequence[float]) -> Tensor:
    """Separable Gaussian blur of one volume with one sigma per axis (a new tensor)."""
    for axis, s in enumerate(sigma):
        v = _blur_axis(v, s, axis)
    return v


def _gaussian_blur(x: Tensor, sigma: Tensor, on: Tensor) -> Tensor:
    """Separable Gaussian blur with its own sigma per (sample, channel, axis), reflect padding.

    x: (n, C, *S); sigma: (n, C, dim); on: (n, C) which channels to blur.  Returns a new tensor.
    """
    out = x.clone()
    for i, c in on.nonzero().tolist():
        out[i, c] = _blur_channel(x[i, c], sigma[i, c].tolist())
    return out


def _stats(v: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased standard deviation of a contiguous volume, as ``v.mean(), v.std()``.

    Two cheap reductions (a sum and a dot product of the centred values) instead of
    ``torch.std``'s single-threaded Welford pass, which is about six times slower on a core.
    """
    flat = v.view(-1)
    mean = flat.mean()
    centred = flat - mean
    var = torch.dot(centred, centred) / max(flat.numel() - 1, 1)
    return mean, var.sqrt()


def _per_channel(value: Tensor | float, x: Tensor) -> Tensor:
    """``value`` (a scalar or anything broadcastable to (n, C, 1, ...)) as one entry per channel
    of x (n, C, *S): entry ``[i, c]`` broadcasts against the volume ``x[i, c]``."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return value.expand(*x.shape[:2], *(1,) * (x.ndim - 2))


def _contrast_(v: Tensor, factor: Tensor) -> None:
    """In place on one channel: scale around its mean, then clip to its original range."""
    mean = v.mean()
    lo, hi = torch.aminmax(v)
    v.sub_(mean).mul_(factor).add_(mean).clamp_(lo, hi)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale around the channel mean, then clip to the channel's original range (new tensor).

    x: (n, C, *S); factor broadcastable to (n, C, 1, ...).
    """
    out = x.clone()
    factor = _per_channel(factor, x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            _contrast_(out[i, c], factor[i, c])
    return out


def _low_res_channel(v: Tensor, zoom: float) -> Tensor:
    """One volume downsampled by ``zoom`` (nearest) and linearly upsampled back (a new tensor)."""
    spatial = list(v.shape)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    down = F.interpolate(v[None, None], [round(s * zoom) for s in spatial], mode="nearest-exact")
    return F.interpolate(down, spatial, mode=mode)[0, 0]


def _simulate_low_res(x: Tensor, zoom: Tensor, on: Tensor) -> Tensor:
    """Nearest-neighbour downsampling then linear upsampling, per selected (sample, channel)."""
    x = x.clone()
    for i, c in on.nonzero().tolist():
        x[i, c] = _low_res_channel(x[i, c], float(zoom[i, c]))
    return x


def _gamma_(v: Tensor, gamma: Tensor, invert: bool) -> None:
    """nnU-Net's gamma in place on one channel: intensities rescaled to [0, 1], raised to
    ``gamma``, scaled back, then the channel's mean and std restored.

    ``invert`` applies it to ``-v`` (brightening instead of darkening the same structures).
    """
    eps = 1e-7
    if invert:
        v.neg_()
    mean, std = _stats(v)
    lo, hi = torch.aminmax(v)
    span = hi - lo
    v.sub_(lo).div_(span.clamp_min(eps)).pow_(gamma).mul_(span).add_(lo)
    y_mean, y_std = _stats(v)
    v.sub_(y_mean).mul_(std / y_std.clamp_min(eps)).add_(mean)
    if invert:
        v.neg_()


def _gamma(x: Tensor, gamma: Tensor, invert: bool) -> Tensor:
    """:func:`_gamma_` on every channel of x (n, C, *S), gamma broadcastable to (n, C, 1, ...)."""
    out = x.contiguous().clone()
    gamma = _per_channel(gamma, x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            _gamma_(out[i, c], gamma[i, c], invert)
    return out


def _intensity(x: Tensor, cfg: dict[str, Any], g: torch.Generator) -> None:
    """nnU-Net's intensity transforms, in its order, in place on ``x`` (B, C, *S).

    Each channel ``x[i, c]`` must be contiguous (true for any channel slice of a contiguous
    batch).  All parameters of a transform are drawn for the whole batch first, so the draws
    from ``g`` do not depend on which samples are picked.
    """
    b, c, *spatial = x.shape
    dim, dev = len(spatial), x.device

    def picked(p: float) -> list[int]:
        return (_rand(g, b, device=dev) < p).nonzero().flatten().tolist()

    # Gaussian noise: one std per sample, shared by its channels.
    chosen = picked(cfg["noise_p"])
    std = _uniform(g, cfg["noise_var"], b, device=dev)
    gd = _device_generator(g, dev)
    for i in chosen:
        noise = torch.randn(x.shape[1:], generator=gd, device=dev, dtype=x.dtype)
        x[i].add_(noise.mul_(std[i]))

    # Gaussian blur: each channel with p 0.5, an independent sigma per axis.
    chosen = picked(cfg["blur_p"])
    on = _rand(g, b, c, device=dev) < _P_PER_CHANNEL_BLUR
    sigma = _uniform(g, cfg["blur_sigma"], b, c, dim, device=dev)
    for i in chosen:
        for ch in on[i].nonzero().flatten().tolist():
            x[i, ch] = _blur_channel(x[i, ch], sigma[i, ch].tolist())

    # Multiplicative brightness, one factor per channel.
    chosen = picked(cfg["brightness_p"])
    factor = _bg_contrast(g, cfg["brightness_range"], b, c, device=dev)
    for i in chosen:
        x[i].mul_(factor[i].view(c, *(1,) * dim))

    # Contrast around the mean, range preserved.
    chosen = picked(cfg["contrast_p"])
    factor = _bg_contrast(g, cfg["contrast_range"], b, c, device=dev)
    for i in chosen:
        for ch in range(c):
            _contrast_(x[i, ch], factor[i, ch])

    # Simulated low resolution: each channel with p 0.5, one zoom for all axes.
    chosen = picked(cfg["lowres_p"])
    on = _rand(g, b, c, device=dev) < _P_PER_CHANNEL_LOWRES
    zoom = _uniform(g, cfg["lowres_zoom"], b, c, device=dev)
    for i in chosen:
        for ch in on[i].nonzero().flatten().tolist():
            x[i, ch] = _low_res_channel(x[i, ch], float(zoom[i, ch]))

    # Inverted gamma first, then gamma, as nnU-Net orders them.
    for key, invert in (("gamma_inv_p", True), ("gamma_p", False)):
        chosen = picked(cfg[key])
        gamma = _bg_contrast(g, cfg["gamma_range"], b, c, device=dev)
        for i in chosen:
            for ch in range(c):
                _gamma_(x[i, ch], gamma[i, ch], invert)
