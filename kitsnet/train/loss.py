"""The training objective: cross-entropy + soft Dice with deep supervision (nnU-Net's
``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, background excluded from the Dice).

Whether the Dice pools the batch (``batch_dice``) comes from the plan: nnU-Net's planner uses
per-sample Dice for 3d_lowres and batch Dice for the others.  The loss is always computed in
float32, also when the network ran under bf16/fp16 autocast (nnU-Net computes it inside autocast,
which runs cross-entropy and softmax in float32 on CUDA).  Deep-supervision targets are the
labels downsampled with ``nearest-exact`` (nnU-Net's ``DownsampleSegForDSTransform``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def soft_dice(
    probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool, smooth: float = 1e-5
) -> torch.Tensor:
    """Mean soft Dice over the foreground classes: over the batch pooled (``batch_dice``) or
    per sample and then averaged, nnU-Net's formula."""
    axes = [0, *range(2, probs.ndim)] if batch_dice else list(range(2, probs.ndim))
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    dc = (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)
    return dc[..., 1:].mean()


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


def total_loss(outputs, target, weights: list[float], batch_dice: bool):
    """Weighted sum of ``dc_ce_loss`` over the deep-supervision outputs (highest first).

    ``target``: the labels at the highest resolution (downsampled here for each output), or
    one target per output as the input pipeline makes them."""
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    targets = target if isinstance(target, list | tuple) else [target] * len(outputs)
    loss = 0.0
    for w, out, t in zip(weights, outputs, targets, strict=False):
        if w == 0:
            continue
        loss = loss + w * dc_ce_loss(out, downsample_target(t, out.shape[2:]), batch_dice)
    return loss
