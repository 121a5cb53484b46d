"""nnU-Net's default training augmentation, batched in torch so it runs where the batch lives.

nnU-Net augments each case on CPU worker processes while the GPU waits; here one call
augments a whole batch with tensor ops (``grid_sample``, grouped convolutions, max-pooling), so
the same code runs on CPU in tests and on the GPU during training.

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


def _centre_crop(x: Tensor, patch: Sequence[int]) -> Tensor:
    start = _centre_start(x.shape[2:], patch)
    index = (slice(None), slice(None)) + tuple(
        slice(b, b + p) for b, p in zip(start, patch, strict=True)
    )
    return x[index]


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
    normalised coordinates that is ``u_in = D_in^-1 A D_patch u_out + t``, one ``affine_grid``.
    """
    n, dim = matrices.shape[0], len(patch)
    start = _centre_start(in_shape, patch)
    half_in = matrices.new_tensor([max(s - 1, 1) / 2 for s in in_shape])
    half_patch = matrices.new_tensor([(p - 1) / 2 for p in patch])
    centre = matrices.new_tensor([b + (p - 1) / 2 for b, p in zip(start, patch, strict=True)])
    linear = matrices * half_patch.view(1, 1, dim) / half_in.view(1, dim, 1)
    shift = (centre / half_in - 1).expand(n, dim)
    # affine_grid and grid_sample order axes (x, y, z) = last spatial axis first.
    theta = torch.cat([linear.flip(1, 2), shift.flip(1)[..., None]], dim=2)
    return F.affine_grid(theta, [n, 1, *patch], align_corners=True)


def _spatial(
    image: Tensor,
    seg: Tensor,
    patch: Sequence[int],
    n_int: int,
    cfg: dict[str, Any],
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    b, dim, device = image.shape[0], image.ndim - 2, image.device
    n_angles = 3 if dim == 3 else 1
    do_rot = _rand(g, b, device=device) < cfg["rotation_p"]
    do_scale = _rand(g, b, device=device) < cfg["scale_p"]
    max_angle = math.radians(float(cfg["rotation_deg"]))
    angles = _uniform(g, (-max_angle, max_angle), b, n_angles, device=device)
    scales = _uniform(g, cfg["scale_range"], b, device=device)

    out_img = _centre_crop(image, patch).clone()
    out_seg = _centre_crop(seg, patch).clone()
    idx = (do_rot | do_scale).nonzero().flatten()
    if idx.numel() == 0:
        return out_img, out_seg

    angles = torch.where(do_rot[idx, None], angles[idx], 0.0)
    scales = torch.where(do_scale[idx], scales[idx], 1.0)
    matrices = _affine_matrices(angles, scales, dim).to(image.dtype)
    grid = _sampling_grid(matrices, image.shape[2:], patch)

    sub = image[idx]
    out_img[idx, :n_int] = F.grid_sample(
        sub[:, :n_int], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    # Labels and the previous stage's one-hot channels must stay labels: nearest neighbour.
    labels = torch.cat([seg[idx].to(image.dtype), sub[:, n_int:]], dim=1)
    labels = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    out_seg[idx] = labels[:, :1].round().to(seg.dtype)
    out_img[idx, n_int:] = labels[:, 1:]
    return out_img, out_seg


# ----------------------------------------------------------------------------- intensity


def _on_samples(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Replace ``x[i]`` by ``fn(x[idx], idx)`` for the samples the mask selects (in place)."""
    idx = mask.nonzero().flatten()
    if idx.numel():
        x[idx] = fn(x[idx], idx)


def _round_to_nearest_odd(v: float) -> int:
    """nnU-Net's kernel-size rule for its Gaussian blur."""
    r = round(v)
    if r % 2 == 1:
        return r
    return r + 1 if v - r >= 0 else r - 1


def _gaussian_blur(x: Tensor, sigma: Tensor, on: Tensor) -> Tensor:
    """Separable Gaussian blur with its own sigma per (sample, channel, axis), reflect padding.

    x: (n, C, *S); sigma: (n, C, dim); on: (n, C) which channels to blur.  All selected channels
    go through one grouped convolution per axis; kernels shorter than the longest are zero-padded,
    which leaves them exact because reflect-padding only feeds the taps they do not use.
    """
    n, c, *spatial = x.shape
    dim = len(spatial)
    flat = x.reshape(1, n * c, *spatial)
    on = on.reshape(n * c)
    if not bool(on.any()):
        return x
    work = flat[:, on]
    sig = sigma.reshape(n * c, dim)[on]
    conv = F.conv3d if dim == 3 else F.conv2d
    for axis in range(dim):
        half = torch.tensor(
            [_round_to_nearest_odd(s * 6 + 0.5) // 2 for s in sig[:, axis].tolist()],
            device=x.device,
        )
        h = int(half.max())
        taps = torch.arange(-h, h + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sig[:, axis, None]) ** 2)
        kernel = kernel * (taps.abs() <= half[:, None])
        kernel = kernel / kernel.sum(1, keepdim=True)
        shape = [kernel.shape[0], 1] + [1] * dim
        shape[2 + axis] = 2 * h + 1
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = h  # F.pad lists last axis first
        work = conv(F.pad(work, pad, mode="reflect"), kernel.view(shape), groups=kernel.shape[0])
    flat = flat.clone()
    flat[:, on] = work
    return flat.view_as(x)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale around the channel mean, then clip to the channel's original range."""
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    return torch.minimum(torch.maximum((x - mean) * factor + mean, lo), hi)


def _simulate_low_res(x: Tensor, zoom: Tensor, on: Tensor) -> Tensor:
    """Nearest-neighbour downsampling then linear upsampling, per selected (sample, channel)."""
    spatial = list(x.shape[2:])
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    x = x.clone()
    for i, c in on.nonzero().tolist():
        small = [round(s * float(zoom[i, c])) for s in spatial]
        down = F.interpolate(x[i, c][None, None], small, mode="nearest-exact")
        x[i, c] = F.interpolate(down, spatial, mode=mode)[0, 0]
    return x


def _gamma(x: Tensor, gamma: Tensor, invert: bool) -> Tensor:
    """nnU-Net's gamma: on intensities rescaled to [0, 1] per channel, then mean and std restored.

    ``invert`` applies it to ``-x`` (brightening instead of darkening the same structures).
    """
    eps = 1e-7
    if invert:
        x = -x
    dims = tuple(range(2, x.ndim))
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = hi - lo
    y = ((x - lo) / span.clamp_min(eps)).pow(gamma) * span + lo
    y_mean, y_std = y.mean(dims, keepdim=True), y.std(dims, keepdim=True)
    y = (y - y_mean) * (std / y_std.clamp_min(eps)) + mean
    return -y if invert else y


def _intensity(x: Tensor, cfg: dict[str, Any], g: torch.Generator) -> None:
    """nnU-Net's intensity transforms, in its order, in place on ``x`` (B, C, *S)."""
    b, c, *spatial = x.shape
    dim, dev = len(spatial), x.device
    view = (b, c) + (1,) * dim

    # Gaussian noise: one std per sample, shared by its channels.
    mask = _rand(g, b, device=dev) < cfg["noise_p"]
    std = _uniform(g, cfg["noise_var"], b, device=dev).view(b, 1, *(1,) * dim)
    gd = _device_generator(g, dev)
    if bool(mask.any()):
        noise = torch.randn(x.shape, generator=gd, device=dev, dtype=x.dtype)
        _on_samples(x, mask, lambda s, i: s + noise[i] * std[i])

    # Gaussian blur: each channel with p 0.5, an independent sigma per axis.
    mask = _rand(g, b, device=dev) < cfg["blur_p"]
    on = _rand(g, b, c, device=dev) < _P_PER_CHANNEL_BLUR
    sigma = _uniform(g, cfg["blur_sigma"], b, c, dim, device=dev)
    _on_samples(x, mask, lambda s, i: _gaussian_blur(s, sigma[i], on[i]))

    # Multiplicative brightness, one factor per channel.
    mask = _rand(g, b, device=dev) < cfg["brightness_p"]
    factor = _bg_contrast(g, cfg["brightness_range"], b, c, device=dev).view(view)
    _on_samples(x, mask, lambda s, i: s * factor[i])

    # Contrast around the mean, range preserved.
    mask = _rand(g, b, device=dev) < cfg["contrast_p"]
    factor = _bg_contrast(g, cfg["contrast_range"], b, c, device=dev).view(view)
    _on_samples(x, mask, lambda s, i: _contrast(s, factor[i]))

    # Simulated low resolution: each channel with p 0.5, one zoom for all axes.
    mask = _rand(g, b, device=dev) < cfg["lowres_p"]
    on = _rand(g, b, c, device=dev) < _P_PER_CHANNEL_LOWRES
    zoom = _uniform(g, cfg["lowres_zoom"], b, c, device=dev)
    _on_samples(x, mask, lambda s, i: _simulate_low_res(s, zoom[i], on[i]))

    # Inverted gamma first, then gamma, as nnU-Net orders them.
    for key, invert in (("gamma_inv_p", True), ("gamma_p", False)):
        mask = _rand(g, b, device=dev) < cfg[key]
        gamma = _bg_contrast(g, cfg["gamma_range"], b, c, device=dev).view(view)
        _on_samples(x, mask, lambda s, i, gm=gamma, inv=invert: _gamma(s, gm[i], inv))


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
    transform.  Returns new tensors (B, C, *patch) and (B, 1, *patch) of the input dtypes.
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
        intensity = out_img[:, :n_int].clone()
        _intensity(intensity, cfg, generator)
        out_img[:, :n_int] = intensity

    axes = range(dim) if cfg["mirror_axes"] is None else [int(a) for a in cfg["mirror_axes"]]
    flips = _rand(generator, image.shape[0], dim, device=torch.device("cpu")) < cfg["mirror_p"]
    for i in range(image.shape[0]):
        flip = [2 + a for a in axes if bool(flips[i, a])]
        if flip:
            out_img[i : i + 1] = out_img[i : i + 1].flip(flip)
            out_seg[i : i + 1] = out_seg[i : i + 1].flip(flip)
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
