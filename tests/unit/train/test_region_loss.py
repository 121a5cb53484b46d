"""Training a region-based configuration: the region targets, Dice + BCE with deep supervision,
training steps and the validation pseudo-Dice per region."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kitsnet.core.regions import REGIONS, labels_to_regions, region_settings
from kitsnet.train.loss import (
    dc_bce_loss,
    deep_supervision_weights,
    downsample_target,
    region_targets,
    total_loss,
)
from kitsnet.train.steps import TrainingState, TrainingSteps

ARCH = {
    "dim": 3,
    "features_per_stage": [4, 8, 16],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 3,
    "n_conv_per_stage": 2,
    "n_conv_per_stage_decoder": 2,
    "deep_supervision": True,
}
TRAINING = {
    "initial_lr": 0.01,
    "momentum": 0.99,
    "nesterov": True,
    "weight_decay": 3e-5,
    "grad_clip": 12.0,
}


def _labels(seed: int, shape=(2, 1, 16, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, shape, generator=g)


def test_region_targets_are_the_label_maps_regions_as_float():
    labels = _labels(0, (2, 1, 5, 6, 7))
    masks = region_targets(labels, REGIONS)
    assert masks.dtype == torch.float32 and masks.shape == (2, 3, 5, 6, 7)
    for y, m in zip(labels, masks, strict=True):
        np.testing.assert_array_equal(m.numpy(), labels_to_regions(y[0].numpy(), REGIONS))


def _reference_dc_bce(logits, masks, batch_dice, smooth=1e-5) -> torch.Tensor:
    """BCE (mean) - mean soft Dice of the sigmoids over every region, written out."""
    p = torch.sigmoid(logits.double())
    m = masks.double()
    bce = -(m * torch.log(p) + (1 - m) * torch.log(1 - p)).mean()
    axes = [0, 2, 3, 4] if batch_dice else [2, 3, 4]
    inter, total = (p * m).sum(axes), (p + m).sum(axes)
    return bce - ((2 * inter + smooth) / (total + smooth)).mean()


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dc_bce_loss_is_bce_minus_soft_dice_over_every_region(batch_dice):
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 3, 8, 9, 10, generator=g)
    labels = _labels(2, (2, 1, 8, 9, 10))
    labels[0, :, :4] = 0  # the samples differ: per-sample and batch Dice differ
    masks = region_targets(labels, REGIONS)
    loss = dc_bce_loss(logits, masks, batch_dice)
    assert loss.dtype == torch.float32
    expected = _reference_dc_bce(logits, masks, batch_dice)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    other = dc_bce_loss(logits, masks, not batch_dice)
    assert not torch.isclose(loss, other)


def test_dc_bce_loss_of_a_perfect_prediction_is_near_its_minimum_of_minus_one():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, 1:7, 1:7, 1:7] = 1
    labels[:, :, 2:6, 2:6, 2:6] = 3
    labels[:, :, 3:5, 3:5, 3:5] = 2
    masks = region_targets(labels, REGIONS)
    perfect = (2 * masks - 1) * 30
    for batch_dice in (False, True):
        best = dc_bce_loss(perfect, masks, batch_dice)
        assert -1.0 <= best < -0.9999
        assert dc_bce_loss(-perfect, masks, batch_dice) > 10  # everything wrong
        assert dc_bce_loss(torch.zeros_like(perfect), masks, batch_dice) > best + 0.5


def test_a_gradient_step_on_the_logits_lowers_the_region_loss():
    labels = _labels(3, (2, 1, 8, 8, 8))
    masks = region_targets(labels, REGIONS)
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    logits.requires_grad_()
    losses = []
    for _ in range(3):
        loss = dc_bce_loss(logits, masks, True)
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= 1000 * grad  # the loss is a mean over 1536 logits: a unit-size step
        losses.append(float(loss.detach()))
    assert losses[2] < losses[1] < losses[0]
    # and the gradient pushes each region logit towards its mask
    loss = dc_bce_loss(logits, masks, True)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[masks > 0] < 0).all() and (grad[masks == 0] > 0).all()


def test_deep_supervised_region_loss_downsamples_the_labels_before_the_masks():
    g = torch.Generator().manual_seed(5)
    shapes = [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    outputs = [torch.randn(2, 3, *s, generator=g) for s in shapes]
    labels = _labels(6)
    w = deep_supervision_weights(len(shapes))
    loss = total_loss(outputs, labels, w, True, regions=REGIONS)
    expected = sum(
        wi * dc_bce_loss(o, region_targets(downsample_target(labels, o.shape[2:]), REGIONS), True)
        for wi, o in zip(w, outputs, strict=True)
        if wi
    )
    torch.testing.assert_close(loss, expected)
    # one target per output (as the input pipeline makes them) gives the same
    targets = [downsample_target(labels, s) for s in shapes]
    torch.testing.assert_close(total_loss(outputs, targets, w, True, regions=REGIONS), loss)
    # the lowest output has weight 0 and no influence
    outputs[-1] = outputs[-1] + 100
    torch.testing.assert_close(total_loss(outputs, labels, w, True, regions=REGIONS), loss)


def test_region_loss_of_bf16_logits_is_computed_in_float32():
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(7))
    logits = logits.to(torch.bfloat16)
    labels = _labels(8, (2, 1, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = total_loss([logits], labels, [1.0], True, regions=REGIONS)
    assert loss.dtype == torch.float32
    expected = dc_bce_loss(logits.float(), region_targets(labels, REGIONS), True)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# TrainingSteps on a region plan


def _region_plan(deep_supervision: bool = True) -> dict:
    return {
        "arch": dict(ARCH, deep_supervision=deep_supervision),
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "num_classes": 4,
        "in_channels": 1,
        "batch_dice": True,
        "previous_stage": None,
        **region_settings(),
    }


class _ReadyBatches:
    """The part of the input pipeline TrainingSteps uses: batches whose targets are made."""

    def finish(self, batch: dict, dev: torch.device):
        return batch["image"].to(dev), [t.to(dev) for t in batch["targets"]]


def _batch(seed: int, n_outputs: int) -> dict:
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = (x > 0.3).long() + (x > 1.0).long() + (x > 1.6).long()  # 0..3, nested
    sizes = [16 // 2**i for i in range(n_outputs)]
    return {"image": x, "targets": [downsample_target(labels, [s] * 3) for s in sizes]}


def test_training_steps_on_a_region_plan_train_three_sigmoid_outputs(one_torch_thread):
    dev = torch.device("cpu")
    plan = _region_plan()
    state = TrainingState(plan, TRAINING, seed=0, fold=0, dev=dev)
    steps = TrainingSteps(plan, TRAINING, _ReadyBatches(), state, dev, log=lambda _: None)
    assert steps.regions == [list(r) for r in REGIONS]
    out = state.net(torch.zeros(1, 1, 16, 16, 16))
    assert [o.shape[1] for o in out] == [3, 3]
    batch = _batch(0, 2)
    losses = [float(steps.step(state, batch)) for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


class _Fixed(torch.nn.Module):
    """A 'network' whose output is given: the logits of each validation batch in turn."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = list(outputs)
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.outputs.pop(0)


def test_validation_pseudo_dice_of_a_region_plan_counts_logits_above_zero_per_region():
    """nnU-Net's online pseudo-Dice for regions: sigmoid > 0.5 (logit > 0) per region,
    TP/FP/FN summed over every batch, then the mean over regions of 2TP / (2TP + FP + FN)."""
    dev = torch.device("cpu")
    plan = _region_plan(deep_supervision=False)
    state = TrainingState(plan, TRAINING, seed=0, fold=0, dev=dev)
    g = torch.Generator().manual_seed(9)
    batches = [_batch(10 + i, 1) for i in range(2)]
    logits = []
    for b in batches:
        masks = region_targets(b["targets"][0], REGIONS)
        # right where the noise is small: a partly correct prediction per region
        logits.append((2 * masks - 1) + 1.5 * torch.randn(masks.shape, generator=g))
    state.net = _Fixed(logits)
    steps = TrainingSteps(plan, TRAINING, _ReadyBatches(), state, dev, log=lambda _: None)
    loss, dice = steps.validate(state, batches)

    tp = fp = fn = 0
    for b, out in zip(batches, logits, strict=True):
        pred, truth = out > 0, region_targets(b["targets"][0], REGIONS) > 0
        axes = (0, 2, 3, 4)
        tp = tp + (pred & truth).sum(axes).double()
        fp = fp + (pred & ~truth).sum(axes).double()
        fn = fn + (~pred & truth).sum(axes).double()
    per_region = 2 * tp / (2 * tp + fp + fn)
    assert 0.3 < float(per_region.min()) and float(per_region.max()) < 0.99
    assert dice == pytest.approx(float(per_region.mean()), rel=1e-12)
    expected_loss = np.mean(
        [
            float(total_loss([o], b["targets"], [1.0], True, regions=REGIONS))
            for b, o in zip(batches, logits, strict=True)
        ]
    )
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_validation_pseudo_dice_ignores_a_region_absent_everywhere():
    """A region neither predicted nor present (no tumor in the patches) is left out of the
    mean, as nnU-Net's nanmean."""
    dev = torch.device("cpu")
    plan = _region_plan(deep_supervision=False)
    state = TrainingState(plan, TRAINING, seed=0, fold=0, dev=dev)
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    labels[:, :, 4:12, 4:12, 4:12] = 1  # kidney only
    masks = region_targets(labels, REGIONS)
    perfect = (2 * masks - 1) * 10
    perfect[:, 0, 4:6] = -10  # kidney partly missed: Dice < 1
    state.net = _Fixed([perfect])
    steps = TrainingSteps(plan, TRAINING, _ReadyBatches(), state, dev, log=lambda _: None)
    batch = {"image": torch.zeros(1, 1, 16, 16, 16), "targets": [labels]}
    _, dice = steps.validate(state, [batch])
    # kidney: 512 voxels, 128 of them missed; masses and tumor: 0 / 0, left out
    assert dice == pytest.approx(2 * 384 / (2 * 384 + 128))
