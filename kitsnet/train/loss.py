"""The training objective: cross-entropy + soft Dice with deep supervision (nnU-Net's
``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, background excluded from the Dice), or,
for a region-based plan, binary cross-entropy + soft Dice of the sigmoid outputs over every
region (nnU-Net's ``DC_and_BCE_loss``, ``do_bg=True``).

Whether the Dice pools the batch (``batch_dice``) comes from the plan: nnU-Net's planner uses
per-sample Dice for 3d_lowres and batch Dice for the others.  The loss is always computed in
float32, also when the network ran under bf16/fp16 autocast (nnU-Net computes it inside autocast,
which runs cross-entropy and softmax in float32 on CUDA).  Deep-supervision targets are the
labels downsampled with ``nearest-exact`` (nnU-Net's ``DownsampleSegForDSTransform``); a
region-based loss turns each into region masks after downsampling.  nnU-Net converts first
(``ConvertSegmentationToRegionsTransform``) and downsamples the masks, which gives the same
targets: nearest-exact picks one source voxel per output voxel, and a voxel's regions depend
on its label alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Regions = Sequence[Sequence[int]]


def soft_dice(
    probs: torch.Tensor,
    onehot: torch.Tensor,
    batch_dice: bool,
    smooth: float = 1e-5,
    background: bool = False,
) -> torch.Tensor:
    """Mean soft Dice over the foreground classes (every channel with ``background``, as for
    regions): over the batch pooled (``batch_dice``) or per sample and then averaged,
    nnU-Net's formula."""
    axes = [0, *range(2, probs.ndim)] if batch_dice else list(range(2, probs.ndim))
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    dc = (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)
    return (dc if background else dc[..., 1:]).mean()


def region_targets(target: torch.Tensor, regions: Regions) -> torch.Tensor:
    """Labels (B, 1, *S) -> float (B, R, *S) masks of the regions (each a set of labels)."""
    masks = []
    for labels in regions:
        inside = torch.zeros_like(target, dtype=torch.bool)
        for label in labels:
            inside |= target == label
        masks.append(inside)
    return torch.cat(masks, 1).float()


def dc_bce_loss(logits: torch.Tensor, regions: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """Binary cross-entropy (mean over voxels and regions) + (1 - soft Dice of the sigmoids
    over every region) in float32, nnU-Net's DC_and_BCE_loss; ``regions`` is (B, R, *S)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, regions)
    return bce - soft_dice(torch.sigmoid(logits), regions, batch_dice, background=True)


def dc_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice) in float32, as nnU-Net's DC_and_CE_loss (which adds
    -Dice); ``target`` is (B, 1, *S) integer labels."""
    logits = logits.float()
    labels = target[:, 0].long()
    ce = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    return ce - soft_dice(probs, onehot, batch_dice)


def deep_supervision_weights(n: int) -> list[float]:
    """1/2^i per output, lowest resolution weighted 0, normalised to sum 1."""
    w = np.array([1 / 2**i for i in range(n)])
    if n > 1:
        w[-1] = 0
    return (w / w.sum()).tolist()


def downsample_target(target: torch.Tensor, size: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Labels (B, 1, *S) at a deep-supervision output's size, ``nearest-exact`` as nnU-Net."""
    if tuple(size) == tuple(target.shape[2:]):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode="nearest-exact").to(target.dtype)


def total_loss(
    outputs, target, weights: list[float], batch_dice: bool, regions: Regions | None = None
):
    """Weighted sum of ``dc_ce_loss`` (``dc_bce_loss`` with ``regions``) over the
    deep-supervision outputs (highest first).

    ``target``: the labels at the highest resolution (downsampled here for each output), or
    one target per output as the input pipeline makes them."""
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    targets = target if isinstance(target, list | tuple) else [target] * len(outputs)
    loss = 0.0
    for w, out, t in zip(weights, outputs, targets, strict=False):
        if w == 0:
            continue
        t = downsample_target(t, out.shape[2:])
        if regions:
            loss = loss + w * dc_bce_loss(out, region_targets(t, regions), batch_dice)
        else:
            loss = loss + w * dc_ce_loss(out, t, batch_dice)
    return loss
