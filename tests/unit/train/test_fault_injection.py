"""Killed training: a process killed at any moment resumes on rerun from its last complete
checkpoint, and the finished model equals an uninterrupted run's (history with no gap and no
repeat, identical weights).  The kills are real (SIGKILL/SIGTERM of a training subprocess),
placed by kitsnet.train.loop's ``KITSNET_FAULT`` test hook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import NO_AUG, TRAINING, _plan, _tiny_preprocessed

from kitsnet.train.loop import CHECKPOINT, PREVIOUS_CHECKPOINT, load_checkpoint, train_fold

# Real training processes killed and rerun: ~30 s in all.
pytestmark = pytest.mark.slow

EPOCHS = 4
# checkpoints after epochs 1 and 3 only, so a kill in epoch 2 or 3 loses work that is redone
SETTINGS = dict(TRAINING, epochs=EPOCHS, iterations_per_epoch=3, checkpoint_every=2)

DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from kitsnet.train.loop import train_fold
    a = json.load(open(sys.argv[1]))
    train_fold(a["plan"], a["splits"], 0, a["data"], a["out"], a["training"], a["aug"], seed=1)
    """
)


@pytest.fixture(autouse=True)
def one_thread():
    """The subprocesses train on one thread; so must the in-process reruns (bit-identity)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    data = root / "pre"
    data.mkdir()
    cases = _tiny_preprocessed(data)
    splits = [{"train": cases[1:], "val": cases[:1]}]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    reference = root / "reference"
    try:
        train_fold(
            _plan(), splits, 0, data, reference, SETTINGS, NO_AUG, seed=1, log=lambda *_: None
        )
    finally:  # a module fixture: do not leave one thread to the tests of later modules
        torch.set_num_threads(before)
    return {"data": data, "splits": splits, "reference": reference, "root": root}


def _run_killed(setup, out: Path, fault: str, settings=SETTINGS) -> subprocess.CompletedProcess:
    args = out.parent / f"{out.name}_args.json"
    args.write_text(
        json.dumps(
            {
                "plan": _plan(),
                "splits": setup["splits"],
                "data": str(setup["data"]),
                "out": str(out),
                "training": settings,
                "aug": NO_AUG,
            }
        )
    )
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, KITSNET_FAULT=fault, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group: "to=group" signals only the training
    )


def _resume(setup, out: Path, settings=SETTINGS) -> list[str]:
    msgs: list[str] = []
    train_fold(
        _plan(), setup["splits"], 0, setup["data"], out, settings, NO_AUG, seed=1, log=msgs.append
    )
    return msgs


def _rows(out: Path) -> list[list[str]]:
    """training_log.csv without the wall-clock column."""
    lines = (out / "training_log.csv").read_text().splitlines()
    head = lines[0].split(",")
    keep = [i for i, h in enumerate(head) if h != "epoch_time_s"]
    return [[row.split(",")[i] for i in keep] for row in lines[1:]]


def _assert_finished_like_reference(out: Path, reference: Path) -> None:
    rows = _rows(out)
    assert [r[0] for r in rows] == [str(e) for e in range(EPOCHS)]  # no gap, no repeat
    assert rows == _rows(reference)  # same losses, Dice, lr: the same run
    for name in ("model_final.pt", "model_best.pt"):
        got, ref = load_checkpoint(out / name), load_checkpoint(reference / name)
        assert got["epochs"] == ref["epochs"]
        assert got["state_dict"].keys() == ref["state_dict"].keys()
        for k, v in ref["state_dict"].items():
            assert torch.equal(got["state_dict"][k], v), f"{name}: {k} differs"
    assert load_checkpoint(out / "model_final.pt")["epochs"] == EPOCHS
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporaries left behind: {leftovers}"


def test_killed_during_an_epoch_while_checkpointing_and_between_epochs(setup, tmp_path):
    """Three SIGKILLs of one training job at three different points, then a clean rerun."""
    out = tmp_path / "fold_0"
    # 1. during epoch 2, after its second iteration: the last checkpoint is epoch 1's
    proc = _run_killed(setup, out, "after_iteration:epoch=2,iteration=1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads(load_checkpoint(out / CHECKPOINT)["history"])[-1]["epoch"] == 1
    assert [r[0] for r in _rows(out)] == ["0", "1"]
    # 2. resumed, then killed half-way through writing epoch 3's checkpoint: the log already
    #    holds epochs 2 and 3, the checkpoint is still epoch 1's and whole
    proc = _run_killed(setup, out, "during_checkpoint_write:epoch=3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "resumed" in proc.stdout and "after epoch 2" in proc.stdout
    assert [r[0] for r in _rows(out)] == ["0", "1", "2", "3"]
    assert any(p.name.startswith(".checkpoint_latest.") for p in out.iterdir())  # half-written
    assert json.loads(load_checkpoint(out / CHECKPOINT)["history"])[-1]["epoch"] == 1
    # 3. resumed again (epochs 2 and 3 redone, not repeated), killed after epoch 2
    proc = _run_killed(setup, out, "between_epochs:epoch=2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "after epoch 2" in proc.stdout
    assert [r[0] for r in _rows(out)] == ["0", "1", "2"]
    # 4. the rerun finishes
    msgs = _resume(setup, out)
    assert any("resumed" in m and "after epoch 2" in m for m in msgs)
    _assert_finished_like_reference(out, setup["reference"])


def test_sigterm_checkpoints_inside_the_epoch_and_the_rerun_continues_there(setup, tmp_path):
    """SLURM preemption: SIGTERM finishes the iteration, checkpoints that exact position and
    exits non-zero; the rerun continues with the next iteration, nothing redone."""
    out = tmp_path / "fold_0"
    proc = _run_killed(setup, out, "after_iteration:epoch=2,iteration=0,signal=TERM")
    assert proc.returncode == 1
    assert "TrainingInterrupted" in proc.stderr and "rerun to resume" in proc.stderr
    msgs = _resume(setup, out)
    assert any("after epoch 2, iteration 1" in m for m in msgs), msgs
    _assert_finished_like_reference(out, setup["reference"])


def test_sigterm_to_the_whole_job_with_workers_checkpoints_and_the_rerun_continues(setup, tmp_path):
    """SLURM signals every process of the job: the batch workers must not die before the
    training process has checkpointed; the rerun (with another worker count) continues."""
    out = tmp_path / "fold_0"
    workers = dict(SETTINGS, workers=2)
    proc = _run_killed(
        setup, out, "after_iteration:epoch=1,iteration=1,signal=TERM,to=group", workers
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "TrainingInterrupted" in proc.stderr and "DataLoader worker" not in proc.stderr
    msgs = _resume(setup, out, dict(SETTINGS, workers=1))
    assert any("after epoch 1, iteration 2" in m for m in msgs), msgs
    _assert_finished_like_reference(out, setup["reference"])


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(setup, tmp_path):
    out = tmp_path / "fold_0"
    every_epoch = dict(SETTINGS, checkpoint_every=1)
    proc = _run_killed(setup, out, "between_epochs:epoch=2", every_epoch)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest = out / CHECKPOINT
    assert (out / PREVIOUS_CHECKPOINT).is_file()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated
    msgs = _resume(setup, out, every_epoch)
    assert any("unreadable checkpoint" in m for m in msgs), msgs
    assert any("resumed" in m and "after epoch 2" in m for m in msgs), msgs
    assert (out / (CHECKPOINT + ".unreadable")).is_file()
    _assert_finished_like_reference(out, setup["reference"])


def test_a_checkpoint_of_other_settings_is_not_resumed(setup, tmp_path):
    out = tmp_path / "fold_0"
    _resume(setup, out, dict(SETTINGS, epochs=1))
    msgs = _resume(setup, out, dict(SETTINGS, initial_lr=0.02))
    assert any("other settings" in m for m in msgs) and not any("resumed" in m for m in msgs)
    assert [r[0] for r in _rows(out)] == [str(e) for e in range(EPOCHS)]


def test_checkpoints_load_with_weights_only(setup):
    ck = torch.load(setup["reference"] / CHECKPOINT, map_location="cpu", weights_only=True)
    assert len(json.loads(ck["history"])) == EPOCHS and ck["best_model"] is not None


def test_an_interrupted_write_leaves_the_old_file_or_nothing(tmp_path):
    from kitsnet.core.io import atomic_path, remove_stale_temporaries, save_json

    target = tmp_path / "out" / "scores.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.parent.exists() or not any(target.parent.iterdir())
    save_json({"a": 1}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    # what a SIGKILL leaves (the finally never runs) is cleaned up by the next run
    stale = target.parent / ".scores.abc123.csv"
    stale.write_text("partial")
    assert remove_stale_temporaries(target) == [stale] and not stale.exists()
