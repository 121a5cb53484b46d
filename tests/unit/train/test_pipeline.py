"""The training input pipeline: the same batches whatever the worker count, the shapes and
dtypes the step expects, and a training run that does not depend on the workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_train import TRAINING, _plan, _tiny_preprocessed

from kitsnet.train.loop import train_fold
from kitsnet.train.pipeline import InputPipeline, batches, ds_target_shapes, epoch_keys

AUG = yaml.safe_load(open("config/config.yaml"))["augmentation"]  # the demo's full set


@pytest.fixture
def tiny(tmp_path):
    data = tmp_path / "pre"
    data.mkdir()
    cases = _tiny_preprocessed(data, shape=(24, 28, 28))
    return data, {"train": cases[1:], "val": cases[:1]}


def _pipeline(data, split, **kw) -> InputPipeline:
    return InputPipeline(_plan(), TRAINING, AUG, split, data, seed=3, fold=1, **kw)


def _flat(batch: dict) -> list[np.ndarray]:
    return [batch["image"].numpy()] + [t.numpy() for t in batch["targets"]]


def test_batches_are_identical_for_zero_one_and_two_workers(tiny):
    data, split = tiny
    keys = epoch_keys(0, 0, 5, 2) + epoch_keys(1, 3, 5, 2)
    runs = {}
    for workers in (0, 1, 2):
        got = list(batches(_pipeline(data, split), keys, workers))
        assert len(got) == len(keys)
        runs[workers] = [_flat(b) for b in got]
    for workers in (1, 2):
        for a, b in zip(runs[0], runs[workers], strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.dtype == y.dtype and np.array_equal(x, y)
    # different keys give different batches (the streams really are per batch)
    assert not np.array_equal(runs[0][0][0], runs[0][1][0])


def test_in_process_batches_do_not_depend_on_the_thread_count(tiny):
    data, split = tiny
    keys = epoch_keys(2, 0, 3, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = [_flat(b) for b in batches(_pipeline(data, split), keys, 0)]
        torch.set_num_threads(1)
        b = [_flat(b) for b in batches(_pipeline(data, split), keys, 0)]
    finally:
        torch.set_num_threads(before)
    assert all(
        np.array_equal(x, y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)
    )


def test_a_batch_has_uint8_targets_at_every_deep_supervision_size(tiny):
    data, split = tiny
    pipe = _pipeline(data, split)
    b = pipe.make(epoch_keys(0, 0, 1, 0)[0])
    assert b["image"].dtype == torch.float32 and tuple(b["image"].shape) == (2, 1, 16, 16, 16)
    assert [list(t.shape[2:]) for t in b["targets"]] == ds_target_shapes(_plan())
    assert ds_target_shapes(_plan()) == [[16, 16, 16], [8, 8, 8]]
    assert all(t.dtype == torch.uint8 for t in b["targets"])


def test_device_side_augmentation_gets_the_region_and_a_seed(tiny):
    data, split = tiny
    pipe = _pipeline(data, split, augment_in_workers=False)
    b = pipe.make(epoch_keys(0, 0, 1, 0)[0])
    assert b["seg"].dtype == torch.uint8 and list(b["image"].shape[2:]) == pipe.region
    x, targets = pipe.finish(b, torch.device("cpu"))
    assert list(x.shape[2:]) == [16, 16, 16] and len(targets) == 2
    # the same seed makes the same augmentation
    x2, _ = pipe.finish(b, torch.device("cpu"))
    assert torch.equal(x, x2)


def test_training_is_the_same_with_and_without_workers(tmp_path, tiny):
    data, split = tiny
    logs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        training = dict(TRAINING, workers=workers, epochs=2)
        train_fold(_plan(), [split], 0, data, out, training, AUG, seed=1, log=lambda *_: None)
        logs[workers] = [
            r.split(",")[:5] for r in (out / "training_log.csv").read_text().splitlines()
        ]
    assert logs[0] == logs[2]


@pytest.mark.parametrize("when", ["at torch.compile", "at the first call"])
def test_training_compile_falls_back_to_eager_with_a_warning(tmp_path, tiny, monkeypatch, when):
    """``training.compile``: where compilation fails (no compiler, an unsupported op), training
    goes on in eager mode and says so, with the same result as an eager run."""

    def broken_compile(net):
        if when == "at torch.compile":
            raise RuntimeError("no C++ compiler")

        def forward(x):
            raise RuntimeError("inductor: backend compiler failed")

        return forward

    data, split = tiny
    logs = {}
    for mode in ("eager", "compile"):
        if mode == "compile":
            monkeypatch.setattr(torch, "compile", broken_compile)
        out, msgs = tmp_path / mode, []
        training = dict(TRAINING, epochs=1, compile=mode == "compile")
        train_fold(_plan(), [split], 0, data, out, training, AUG, seed=1, log=msgs.append)
        logs[mode] = [r.split(",")[:5] for r in (out / "training_log.csv").read_text().splitlines()]
        if mode == "compile":
            warnings = [m for m in msgs if "torch.compile" in m and "eager" in m]
            assert len(warnings) == 1, msgs
    assert logs["compile"] == logs["eager"]
