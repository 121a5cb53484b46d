"""nnU-Net's default training augmentation, batched in torch so it runs where the batch lives.

nnU-Net augments each case on CPU worker processes while the GPU waits; here one call
augments a whole batch with tensor ops (``grid_sample``, shifted-view sums, max-pooling), so
the same code runs on CPU and GPU.  On one CPU core, sampling plus augmentation makes
patches more than twice as fast as nnU-Net's loader and transforms
(``python -m benchmarks --only augment``).  Each transform touches only the samples nnU-Net's
probabilities pick, in place, and costly primitives are replaced by cheaper equivalents that
give the same values up to float rounding (see :func:`_box_grid`, :func:`_blur_axis`,
:func:`_stats`).

The transforms, their order and their probabilities follow nnU-Net v2's
``nnUNetTrainer.get_training_transforms`` (batchgeneratorsv2): spatial (rotation, scaling, centre
crop), Gaussian noise, Gaussian blur, multiplicative brightness, contrast, simulated low
resolution, inverted gamma, gamma, mirroring.  Every probability is per sample, as in nnU-Net,
and all randomness comes from one ``torch.Generator`` so a seed reproduces a batch exactly.

Differences from nnU-Net, on purpose: the segmentation is resampled with nearest neighbour
(nnU-Net 2.8 interpolates each label linearly and takes the arg-max), and the cascade's
morphology uses iterated max-pooling (an approximate ball) instead of an FFT convolution with an
exact ball.  Both are augmentations whose exact shape does not matter, and both are cheap on GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULTS",
    "augment_batch",
    "cascade_binary_ops",
    "default_config",
    "remove_random_components",
]

DEFAULTS: dict[str, Any] = {
    "rotation_p": 0.2,
    "rotation_deg": 30.0,  # 3D, per axis; 2D uses 180 unless the config says otherwise
    "scale_p": 0.2,
    "scale_range": [0.7, 1.4],  # > 1 samples a larger region: objects get smaller
    "noise_p": 0.1,
    "noise_var": [0.0, 0.1],  # nnU-Net calls it a variance but uses it as the std
    "blur_p": 0.2,
    "blur_sigma": [0.5, 1.0],
    "brightness_p": 0.15,
    "brightness_range": [0.75, 1.25],
    "contrast_p": 0.15,
    "contrast_range": [0.75, 1.25],
    "lowres_p": 0.25,
    "lowres_zoom": [0.5, 1.0],
    "gamma_p": 0.3,
    "gamma_inv_p": 0.1,
    "gamma_range": [0.7, 1.5],
    "mirror_p": 0.5,
    "mirror_axes": None,  # None: every spatial axis
}

# nnU-Net applies blur, low resolution to each channel of a chosen sample with this probability.
_P_PER_CHANNEL_BLUR = 0.5
_P_PER_CHANNEL_LOWRES = 0.5


def default_config(dim: int) -> dict[str, Any]:
    """nnU-Net's defaults for a 2D or 3D network (2D rotates in-plane by up to 180 degrees)."""
    cfg = dict(DEFAULTS)
    if dim == 2:
        cfg["rotation_deg"] = 180.0
    return cfg


# ----------------------------------------------------------------------------- random draws


def _rand(g: torch.Generator, *shape: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=g, device=g.device).to(device)


def _uniform(
    g: torch.Generator, lo_hi: Sequence[float], *shape: int, device: torch.device
) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * _rand(g, *shape, device=device)


def _bg_contrast(
    g: torch.Generator, lo_hi: Sequence[float], *shape: int, device: torch.device
) -> Tensor:
    """nnU-Net's ``BGContrast``: half the draws below 1, half above, so shrinking and growing
    are equally likely although the range is not symmetric around 1."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    below = _rand(g, *shape, device=device) < 0.5
    low = _uniform(g, (lo, 1.0), *shape, device=device)
    high = _uniform(g, (max(lo, 1.0), hi), *shape, device=device)
    return torch.where(below & (lo < 1), low, high)


def _device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``g``: big noise fields are drawn where they live."""
    if g.device == device:
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- spatial


def _centre_start(in_shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """Crop start per axis, as nnU-Net's crop around ``floor(shape / 2)``."""
    return [s // 2 - p // 2 for s, p in zip(in_shape, patch, strict=True)]


def _centre_index(in_shape: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    """The spatial slices of the centre crop."""
    start = _centre_start(in_shape, patch)
    return tuple(slice(b, b + p) for b, p in zip(start, patch, strict=True))


def _centre_crop(x: Tensor, patch: Sequence[int]) -> Tensor:
    return x[(slice(None), slice(None), *_centre_index(x.shape[2:], patch))]


def _affine_matrices(angles: Tensor, scales: Tensor, dim: int) -> Tensor:
    """Per-sample ``R @ S`` as nnU-Net builds it (3D: ``Rz @ Ry @ Rx @ S``), shape (n, dim, dim)."""
    n = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if dim == 2:
        rot = torch.stack([c[:, 0], -s[:, 0], s[:, 0], c[:, 0]], -1).view(n, 2, 2)
    else:
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1)
        rot = rz.view(n, 3, 3) @ ry.view(n, 3, 3) @ rx.view(n, 3, 3)
    return rot * scales.view(n, 1, 1)  # right-multiplying by diag(scale) scales the columns


def _sampling_grid(matrices: Tensor, in_shape: Sequence[int], patch: Sequence[int]) -> Tensor:
    """``grid_sample`` grid (align_corners=True) that maps each patch voxel through the affine.

    Patch coordinates are centred on the patch centre, transformed, and placed on the same
    centre the plain crop uses, so an identity matrix samples exactly the crop's voxels.  In
    normalised coordinates that is ``u_in = D_in^-1 A D_patch u_out + t``.
    """
    start = _centre_start(in_shape, patch)
    centre = [b + (p - 1) / 2 for b, p in zip(start, patch, strict=True)]
    return _box_grid(matrices, centre, [0] * len(patch), in_shape, patch)


def _box_grid(
    matrices: Tensor,
    centre: Sequence[float],
    origin: Sequence[int],
    box: Sequence[int],
    patch: Sequence[int],
) -> Tensor:
    """The grid that samples ``x = A (p - (patch - 1) / 2) + centre`` (voxel units of the whole
    input) from the box of shape ``box`` starting at voxel ``origin`` of the input.

    This is what ``affine_grid`` computes, built from per-axis ramps instead: the map is
    separable, so each output coordinate is a sum of one ramp per patch axis and only the last
    addition touches every voxel; on one CPU core that is about five times faster than
    ``affine_grid``'s batched matrix product over a homogeneous base grid.
    """
    n, dim = matrices.shape[0], len(patch)
    half_in = matrices.new_tensor([max(s - 1, 1) / 2 for s in box])
    half_patch = matrices.new_tensor([(p - 1) / 2 for p in patch])
    local = matrices.new_tensor([c - o for c, o in zip(centre, origin, strict=True)])
    linear = matrices * half_patch.view(1, 1, dim) / half_in.view(1, dim, 1)
    shift = local / half_in - 1
    ramps = []
    for j, p in enumerate(patch):  # ramp j: -1 .. 1 along patch axis j (0 if the axis is flat)
        shape = [1] * (dim + 1)
        shape[1 + j] = p
        ramp = torch.linspace(-1, 1, p, dtype=matrices.dtype, device=matrices.device)
        ramps.append((ramp if p > 1 else torch.zeros_like(ramp)).view(shape))
    grid = matrices.new_empty((n, *patch, dim))
    coef = linear.view(n, dim, dim, *(1,) * dim)
    for a in range(dim):  # input axis a is grid component dim-1-a: grid_sample lists x first
        acc = shift[a] + coef[:, a, 0] * ramps[0]
        for j in range(1, dim - 1):
            acc = acc + coef[:, a, j] * ramps[j]
        torch.addcmul(acc, coef[:, a, dim - 1], ramps[dim - 1], out=grid[..., dim - 1 - a])
    return grid


def _reach(
    matrix: Sequence[Sequence[float]],
    centre: Sequence[float],
    in_shape: Sequence[int],
    patch: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Origin and shape of the smallest box of the input that a transformed patch reads.

    The patch's image under the affine lies within ``centre +- |A| (patch - 1) / 2``; one
    voxel of margin covers the linear interpolation's second neighbour and rounding.  Points
    outside the input read zeros whether or not the box is clipped, so clipping is exact.
    """
    origin, shape = [], []
    for a, (c, s) in enumerate(zip(centre, in_shape, strict=True)):
        r = sum(abs(m) * (p - 1) / 2 for m, p in zip(matrix[a], patch, strict=True))
        lo = max(math.floor(c - r) - 1, 0)
        hi = min(math.ceil(c + r) + 1, s - 1)
        origin.append(lo)
        shape.append(hi - lo + 1)
    return origin, shape


def _spatial(
    image: Tensor,
    seg: Tensor,
    patch: Sequence[int],
    n_int: int,
    cfg: dict[str, Any],
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Rotate/scale the samples nnU-Net's probabilities pick and centre-crop all to ``patch``.

    One sample at a time, straight into fresh output tensors: a sample that is not moved is a
    plain copy of its centre crop; a moved one is resampled from the box of the input its patch
    reaches (:func:`_reach`), so only that box of the labels is converted to float for the
    nearest-neighbour ``grid_sample`` and no sub-batch of the (large) input is gathered.
    """
    b, dim, device = image.shape[0], image.ndim - 2, image.device
    n_angles = 3 if dim == 3 else 1
    do_rot = _rand(g, b, device=device) < cfg["rotation_p"]
    do_scale = _rand(g, b, device=device) < cfg["scale_p"]
    max_angle = math.radians(float(cfg["rotation_deg"]))
    angles = _uniform(g, (-max_angle, max_angle), b, n_angles, device=device)
    scales = _uniform(g, cfg["scale_range"], b, device=device)

    in_shape = image.shape[2:]
    out_img = image.new_empty((b, image.shape[1], *patch))
    out_seg = seg.new_empty((b, 1, *patch))
    crop = (slice(None), *_centre_index(in_shape, patch))
    centre = [s + (p - 1) / 2 for s, p in zip(_centre_start(in_shape, patch), patch, strict=True)]
    moved = (do_rot | do_scale).tolist()
    if any(moved):
        angles = torch.where(do_rot[:, None], angles, 0.0)
        scales = torch.where(do_scale, scales, 1.0)
        matrices = _affine_matrices(angles, scales, dim).to(image.dtype)
    for i in range(b):
        if not moved[i]:
            out_img[i] = image[i][crop]
            out_seg[i] = seg[i][crop]
            continue
        origin, box = _reach(matrices[i].tolist(), centre, in_shape, patch)
        grid = _box_grid(matrices[i : i + 1], centre, origin, box, patch)
        spans = (slice(o, o + s) for o, s in zip(origin, box, strict=True))
        region = (slice(i, i + 1), slice(None), *spans)
        sub = image[region]
        if n_int:
            out_img[i, :n_int] = F.grid_sample(
                sub[:, :n_int], grid, "bilinear", "zeros", align_corners=True
            )[0]
        # Labels and the previous stage's one-hot channels must stay labels: nearest neighbour
        # (exact on float copies of small integers; the copy into out_seg casts them back).
        labels = seg[region].to(image.dtype)
        out_seg[i] = F.grid_sample(labels, grid, "nearest", "zeros", align_corners=True)[0]
        if n_int < image.shape[1]:
            out_img[i, n_int:] = F.grid_sample(
                sub[:, n_int:], grid, "nearest", "zeros", align_corners=True
            )[0]
    return out_img, out_seg


# ----------------------------------------------------------------------------- intensity
#
# Every transform works in place on one sample (or one channel) at a time: nnU-Net's
# probabilities pick few samples per transform, and a view of the chosen one costs nothing,
# where gathering the chosen samples (``x[idx]``) and scattering them back copies twice.


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


# ----------------------------------------------------------------------------- entry point


def augment_batch(
    image: Tensor,
    seg: Tensor,
    patch_size: Sequence[int],
    cfg: dict[str, Any],
    generator: torch.Generator,
    n_intensity_channels: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Augment a batch the way nnU-Net's trainer does and crop it to ``patch_size``.

    image: (B, C, *S_in) float; seg: (B, 1, *S_in) integer labels.  ``S_in`` may exceed the
    patch (the loader samples a larger region so rotated patches have no empty corners).
    Channels from ``n_intensity_channels`` on (the cascade's one-hot of the previous stage) are
    moved with the labels (nearest neighbour, mirroring) but get no intensity transform, as in
    nnU-Net where they join the image only after the intensity transforms.  ``cfg`` overrides
    :func:`default_config`; unknown keys are an error so that a typo cannot silently disable a
    transform.  Returns new tensors (B, C, *patch) and (B, 1, *patch) of the input dtypes; the
    inputs are not modified.
    """
    dim = image.ndim - 2
    if dim not in (2, 3):
        raise ValueError(f"image must be (B, C, *S) with 2 or 3 spatial axes, got {image.shape}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point, got {image.dtype}")
    if seg.is_floating_point() or seg.shape[1] != 1:
        raise TypeError(f"seg must be (B, 1, *S) integer labels, got {seg.dtype} {seg.shape}")
    if seg.shape[0] != image.shape[0] or seg.shape[2:] != image.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and seg {tuple(seg.shape)} disagree")
    patch = [int(p) for p in patch_size]
    if len(patch) != dim or any(p > s for p, s in zip(patch, image.shape[2:], strict=True)):
        raise ValueError(f"patch {patch} must fit inside the input {tuple(image.shape[2:])}")
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown augmentation settings {sorted(unknown)}")
    cfg = {**default_config(dim), **cfg}
    n_int = image.shape[1] if n_intensity_channels is None else int(n_intensity_channels)
    if not 0 <= n_int <= image.shape[1]:
        raise ValueError(f"n_intensity_channels={n_int} outside 0..{image.shape[1]}")

    out_img, out_seg = _spatial(image, seg, patch, n_int, cfg, generator)
    if n_int:
        _intensity(out_img[:, :n_int], cfg, generator)  # fresh tensors: in place is safe

    axes = range(dim) if cfg["mirror_axes"] is None else [int(a) for a in cfg["mirror_axes"]]
    flips = _rand(generator, image.shape[0], dim, device=torch.device("cpu")) < cfg["mirror_p"]
    for i in range(image.shape[0]):
        flip = [1 + a for a in axes if bool(flips[i, a])]
        if flip:
            out_img[i] = out_img[i].flip(flip)
            out_seg[i] = out_seg[i].flip(flip)
    return out_img, out_seg


# ----------------------------------------------------------------------------- cascade


def _dilate(x: Tensor, radius: int) -> Tensor:
    """Binary dilation of (N, 1, *S) by an approximate ball of ``radius`` voxels.

    Two of every three steps grow by the face-neighbour cross, the third by the full 3^dim box:
    the Minkowski sum stays within about 6% of a Euclidean ball along the axes and diagonals.
    Outside the volume counts as background (max-pool pads with -inf).
    """
    dim = x.ndim - 2
    pool = F.max_pool3d if dim == 3 else F.max_pool2d
    for step in range(radius):
        if step % 3 == 2:
            x = pool(x, 3, stride=1, padding=1)
        else:
            grown = x
            for axis in range(dim):
                k = [1] * dim
                k[axis] = 3
                pad = [0] * dim
                pad[axis] = 1
                grown = torch.maximum(grown, pool(x, k, stride=1, padding=pad))
            x = grown
    return x


def _erode(x: Tensor, radius: int) -> Tensor:
    """Erosion as the dual of dilation; outside the volume counts as foreground, as in nnU-Net."""
    return 1 - _dilate(1 - x, radius)


_BINARY_OPS: list[Callable[[Tensor, int], Tensor]] = [
    _dilate,
    _erode,
    lambda x, r: _erode(_dilate(x, r), r),  # closing
    lambda x, r: _dilate(_erode(x, r), r),  # opening
]


def cascade_binary_ops(
    onehot: Tensor,
    generator: torch.Generator,
    p: float = 0.4,
    p_per_label: float = 0.5,
    radius: Sequence[float] = (1, 8),
) -> Tensor:
    """Randomly dilate, erode, open or close the previous stage's one-hot channels.

    Teaches the cascade's second stage not to trust the coarse segmentation blindly.  As in
    nnU-Net's ``ApplyRandomBinaryOperatorTransform``: per sample with ``p``, labels visited in
    random order, each with ``p_per_label``; voxels a label gains are removed from the other
    labels so the encoding stays one-hot.  onehot: (B, L, *S), values 0/1, any dtype.
    """
    out = onehot.clone()
    b, n_labels = onehot.shape[:2]
    dev = torch.device("cpu")
    for i in range(b):
        if float(_rand(generator, 1, device=dev)) >= p:
            continue
        order = torch.randperm(n_labels, generator=generator, device=generator.device).tolist()
        for label in order:
            if float(_rand(generator, 1, device=dev)) >= p_per_label:
                continue
            op = int(torch.randint(0, 4, (1,), generator=generator, device=generator.device))
            r = max(1, round(float(_uniform(generator, radius, 1, device=dev))))
            before = out[i, label] > 0
            after = _BINARY_OPS[op](before[None, None].float(), r)[0, 0] > 0
            added = after & ~before
            out[i, :, added] = 0
            out[i, label] = after.to(out.dtype)
    return out


def remove_random_components(
    onehot: Tensor,
    generator: torch.Generator,
    p: float = 0.2,
    p_per_label: float = 0.5,
    max_fraction: float = 0.15,
) -> Tensor:
    """Delete one random small connected component per chosen label of the previous stage.

    Mimics a coarse stage that missed a structure (e.g. a small cyst).  As in nnU-Net's
    ``RemoveRandomConnectedComponentFromOneHotEncodingTransform``: per sample with ``p``, each
    label with ``p_per_label``; only components under ``max_fraction`` of the patch are eligible,
    so a whole kidney is never removed.  Components use full (26-) connectivity, on CPU.
    """
    out = onehot.clone()
    b, n_labels, *spatial = onehot.shape
    structure = np.ones((3,) * len(spatial), dtype=bool)
    limit = max_fraction * math.prod(spatial)
    dev = torch.device("cpu")
    for i in range(b):
        if float(_rand(generator, 1, device=dev)) >= p:
            continue
        chosen = (_rand(generator, n_labels, device=dev) < p_per_label).nonzero().flatten()
        for label in chosen.tolist():
            mask = (out[i, label] > 0).cpu().numpy()
            if not mask.any():
                continue
            components, n = scipy.ndimage.label(mask, structure=structure)
            sizes = np.bincount(components.ravel())[1:]
            eligible = np.flatnonzero(sizes < limit) + 1
            if eligible.size == 0:
                continue
            pick = int(
                torch.randint(0, eligible.size, (1,), generator=generator, device=generator.device)
            )
            drop = torch.from_numpy(components == eligible[pick]).to(out.device)
            out[i, label][drop] = 0
    return out
