"""The batch driver: validates a batch, runs the transforms in nnU-Net's order, mirrors.

Owns the order of the transforms (and so the order of the random draws) and the checks on what
the caller passes in; the transforms themselves live in :mod:`.spatial` and :mod:`.intensity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kitsnet.train.augment.config import DEFAULTS, default_config
from kitsnet.train.augment.draws import _rand
from kitsnet.train.augment.intensity import _intensity
from kitsnet.train.augment.spatial import _spatial


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
