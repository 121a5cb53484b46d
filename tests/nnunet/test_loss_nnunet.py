"""The training loss against nnU-Net v2's, on the same network outputs and labels.

Needs the optional ``peer`` extra; skipped without it.  nnU-Net's trainer builds
``DC_and_CE_loss`` (``MemoryEfficientSoftDiceLoss``, background excluded, smooth 1e-5) with the
plan's ``batch_dice``, wraps it in ``DeepSupervisionWrapper`` with halving weights (the lowest
output weighted 0) and gets the lower-resolution targets from ``DownsampleSegForDSTransform``
(``nearest-exact``).  kitsnet's ``total_loss`` must give the same value for per-sample and batch
Dice, on targets whose nearest-exact and nearest downsamplings differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (  # noqa: E402
    DownsampleSegForDSTransform,
)
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402

from kitsnet.train.loss import deep_supervision_weights, downsample_target, total_loss  # noqa: E402

pytestmark = pytest.mark.peer

SHAPES = [(24, 24, 24), (12, 12, 12), (6, 6, 6), (3, 3, 3)]


def _nnunet_loss(batch_dice: bool) -> torch.nn.Module:
    dice_kwargs = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}
    loss = DC_and_CE_loss(dice_kwargs, {}, 1, 1, None, MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2**i for i in range(len(SHAPES))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


@pytest.mark.parametrize("batch_dice", [False, True])
def test_loss_equals_nnunets_deep_supervised_dc_and_ce(batch_dice: bool) -> None:
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 4, *s, generator=g) for s in SHAPES]
    labels = torch.randint(0, 4, (2, 1, *SHAPES[0]), generator=g)
    labels[1, :, 4:12] = 0  # the samples differ, so per-sample and batch Dice differ
    ds = DownsampleSegForDSTransform([[s / SHAPES[0][0]] * 3 for s, *_ in SHAPES])
    per_sample = [ds(segmentation=y)["segmentation"] for y in labels]
    targets = [torch.stack(t) for t in zip(*per_sample, strict=True)]
    expected = _nnunet_loss(batch_dice)(outputs, [t.long() for t in targets])
    ours = total_loss(outputs, labels, deep_supervision_weights(len(SHAPES)), batch_dice)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    for target, (size, *_) in zip(targets, SHAPES, strict=True):
        assert torch.equal(downsample_target(labels, [size] * 3), target)
    # nearest-exact, not nearest: the two pick other voxels (already for a factor 2)
    nearest = torch.nn.functional.interpolate(labels.float(), size=(12, 12, 12), mode="nearest")
    assert not torch.equal(downsample_target(labels, (12, 12, 12)), nearest.long())


def test_loss_of_bf16_logits_is_computed_in_float32() -> None:
    """Under bf16 autocast the network's outputs are bf16; the loss must equal the float32 loss
    of the same (bf16-rounded) values, as nnU-Net's autocast runs cross-entropy in float32."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 16, 16, 16, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 4, (2, 1, 16, 16, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = total_loss([logits], labels, [1.0], True)
    expected = _nnunet_loss(True).loss(logits.float(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
