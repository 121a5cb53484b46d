"""Training: loss, sampling, a real optimisation step, checkpoints and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kitsnet.model.network import build_network
from kitsnet.train.augment import DEFAULTS
from kitsnet.train.loop import load_checkpoint, train_fold
from kitsnet.train.loss import dc_ce_loss, deep_supervision_weights, total_loss

ARCH = {
    "dim": 3,
    "features_per_stage": [4, 8, 16],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 3,
    "n_conv_per_stage": 2,
    "n_conv_per_stage_decoder": 2,
    "deep_supervision": True,
}


def test_deep_supervision_weights_halve_and_ignore_the_lowest():
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_perfect_prediction_has_minimal_loss():
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target[:, 0], 2).movedim(-1, 1).float() * 20
    assert dc_ce_loss(perfect, target, True) < -0.99
    assert dc_ce_loss(-perfect, target, True) > 0.5


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    net = build_network(ARCH, 1, 4)
    x = torch.randn(2, 1, 16, 16, 16)
    y = (x > 0.5).long() + (x > 1.5).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    w = deep_supervision_weights(2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = total_loss(net(x), y, w, True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def _tiny_preprocessed(root, n=5, shape=(20, 24, 24)):
    """Preprocessed-layout cases written directly (image, seg, json) for fast loop tests."""
    import json

    rng = np.random.default_rng(0)
    cases = [f"case_{i:05d}" for i in range(n)]
    for c in cases:
        seg = np.zeros(shape, np.uint8)
        seg[5:15, 6:18, 6:18] = 1
        seg[8:12, 9:13, 9:13] = 2
        img = (seg * 2.0 + rng.normal(0, 0.3, shape)).astype(np.float32)[None]
        np.save(root / f"{c}_image.npy", img)
        np.save(root / f"{c}_seg.npy", seg)
        locs = {str(k): np.argwhere(seg == k).tolist() for k in (1, 2, 3)}
        (root / f"{c}.json").write_text(json.dumps({"class_locations": locs, "shape": shape}))
    return cases


TRAINING = {
    "epochs": 3,
    "iterations_per_epoch": 2,
    "val_iterations": 1,
    "initial_lr": 0.01,
    "momentum": 0.99,
    "nesterov": True,
    "weight_decay": 3e-5,
    "poly_exponent": 0.9,
    "grad_clip": 12.0,
    "oversample_foreground": 0.33,
    "ema_alpha": 0.9,
    "checkpoint_every": 1,
}
NO_AUG = {k: 0.0 for k in DEFAULTS if k.endswith("_p")}


def _plan():
    return {
        "arch": ARCH,
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "num_classes": 4,
        "in_channels": 1,
        "previous_stage": None,
    }


@pytest.fixture
def tiny_fold(tmp_path):
    """Preprocessed tiny cases and a one-fold split: (data folder, splits)."""
    data = tmp_path / "pre"
    data.mkdir()
    cases = _tiny_preprocessed(data)
    return data, [{"train": cases[1:], "val": cases[:1]}]


def test_training_writes_models_and_a_gapless_log(tmp_path, tiny_fold):
    data, splits = tiny_fold
    out = tmp_path / "fold_0"
    train_fold(_plan(), splits, 0, data, out, TRAINING, NO_AUG, seed=1, log=lambda *_: None)
    for name in ("model_final.pt", "model_best.pt", "checkpoint_latest.pt", "training_log.csv"):
        assert (out / name).is_file()
    log = (out / "training_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1", "2"]
    assert load_checkpoint(out / "model_final.pt")["epochs"] == 3


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_fold):
    data, splits = tiny_fold
    full = tmp_path / "full"
    train_fold(_plan(), splits, 0, data, full, TRAINING, NO_AUG, seed=1, log=lambda *_: None)
    part = tmp_path / "part"
    # "killed" after two epochs: train with epochs=2 keeps the checkpoint of epoch 2 ...
    short = dict(TRAINING, epochs=3)
    train_fold(
        _plan(), splits, 0, data, part, dict(short, epochs=2), NO_AUG, seed=1, log=lambda *_: None
    )
    (part / "model_final.pt").unlink()
    ck = load_checkpoint(part / "checkpoint_latest.pt")
    assert len(__import__("json").loads(ck["history"])) == 2
    # ... a restart resumes at epoch 2 instead of starting over
    msgs = []
    train_fold(_plan(), splits, 0, data, part, short, NO_AUG, seed=1, log=msgs.append)
    assert any("resumed" in m and "epoch 2" in m for m in msgs)
    log = (part / "training_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["0", "1", "2"]
