"""Checkpoints, resume and the SIGTERM stop of a training job.

Every ``checkpoint_every`` epochs (and at the last) the whole training state -- model,
optimiser, RNG states, logged history, EMA, the best model's weights -- goes to
``checkpoint_latest.pt``, written under a temporary name, flushed and renamed; the checkpoint it
replaces is kept as ``checkpoint_previous.pt``.  A job restarted after a kill at any moment
resumes from the newest checkpoint that loads (a truncated or unreadable one is reported and
the previous one used), so the epoch count and the history have no gap and no repeat, and on
the CPU the resumed run is bit-identical to an uninterrupted one.  A checkpoint made with other
settings or other input data is not resumed: training starts over.  On SIGTERM (SLURM
preemption, ``scancel``) the current iteration finishes, a checkpoint of the exact position
inside the epoch is written and the job exits with :class:`TrainingInterrupted`; the rerun
continues from that iteration.

Test hook: ``KITSNET_FAULT=POINT[:key=value,...]`` makes training kill itself (SIGKILL, or the
signal named by ``signal=TERM``) at POINT: ``after_iteration`` (keys ``epoch``, ``iteration``),
``during_checkpoint_write`` (``epoch``; half of the checkpoint's bytes written) or
``between_epochs`` (``epoch``; after that epoch's log and checkpoint).  See
tests/unit/train/test_fault_injection.py.  Without the variable the hook does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import signal
from pathlib import Path

import torch

from kitsnet.core.io import KitsnetError, atomic_path, remove_stale_temporaries

CHECKPOINT = "checkpoint_latest.pt"
PREVIOUS_CHECKPOINT = "checkpoint_previous.pt"
_CHECKPOINT_KEYS = ("model", "optimizer", "history", "torch_rng")
# what does not change the result of an epoch: where it runs, how often it is saved, and the
# number of epochs (a finished run may be extended; the poly schedule follows the new total), and
# how the batches are made (the same batches whatever the workers, compilation or memory format)
_NOT_FINGERPRINTED = (
    "device",
    "threads",
    "checkpoint_every",
    "epochs",
    "workers",
    "augment_on",
    "compile",
    "channels_last",
)
# how batch streams are seeded: checkpoints of an older scheme start over instead of resuming
# with other batches
BATCH_STREAMS = "per-batch-seed-v1"


class TrainingInterrupted(KitsnetError):
    """Training stopped on SIGTERM after writing a checkpoint; rerunning the job resumes it."""


def fault_point(point: str, **where: int) -> None:
    """Test hook (see the module docstring): kill this process at ``point`` when asked to."""
    spec = os.environ.get("KITSNET_FAULT")
    if not spec:
        return
    name, _, args = spec.partition(":")
    want = dict(kv.split("=", 1) for kv in args.split(",") if kv)
    sig = getattr(signal, "SIG" + want.pop("signal", "KILL"))
    group = want.pop("to", "self") == "group"  # the whole process group, as SLURM signals a job
    if name == point and all(str(where.get(k)) == v for k, v in want.items()):
        if group:
            os.killpg(os.getpgid(0), sig)
        else:
            os.kill(os.getpid(), sig)


def save_torch(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint_file(obj: dict, path: Path, previous: Path, epoch: int) -> None:
    """Write ``path`` whole (temporary + fsync + rename), keeping the one it replaces."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            fault_point("during_checkpoint_write", epoch=epoch)
            fh.write(data[len(data) // 2 :])
        if path.exists():
            os.replace(path, previous)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint safely (weights_only); a truncated file raises KitsnetError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KitsnetError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc


def load_resumable_checkpoint(out_dir: Path, fingerprint: str, log=print) -> dict | None:
    """The newest checkpoint of ``out_dir`` that loads and was made with these settings.

    ``checkpoint_latest.pt`` first, then ``checkpoint_previous.pt``.  An unreadable checkpoint
    is reported and moved aside (so the next save cannot rotate it over the good one); checkpoints
    of other settings are deleted and ``None`` returned (training starts over).
    """
    paths = [out_dir / CHECKPOINT, out_dir / PREVIOUS_CHECKPOINT]
    for path in paths:
        remove_stale_temporaries(path)
    for path in paths:
        if not path.exists():
            continue
        try:
            ck = load_checkpoint(path)
            missing = [k for k in _CHECKPOINT_KEYS if k not in ck]
            if missing:
                raise KitsnetError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
        except KitsnetError as exc:
            aside = path.with_name(path.name + ".unreadable")
            log(f"{exc}; moved to {aside.name}, trying the previous checkpoint")
            os.replace(path, aside)
            continue
        if ck.get("fingerprint") != fingerprint:
            log(f"{path} was made with other settings or input data; starting over")
            for p in paths:
                p.unlink(missing_ok=True)
            return None
        if path.name == PREVIOUS_CHECKPOINT:
            os.replace(path, paths[0])  # the next save keeps it as the previous one
            ck["_path"] = str(paths[0])
        else:
            ck["_path"] = str(path)
        return ck
    return None


def settings_fingerprint(
    plan: dict,
    split: dict,
    fold: int,
    seed: int,
    training: dict,
    augmentation: dict,
    input_files: list[Path],
) -> str:
    """What a checkpoint must have been made with to be resumed: the settings and the inputs
    (name, size and modification time of every file training reads)."""
    files = []
    for f in sorted(input_files):
        st = f.stat()
        files.append([str(f), st.st_size, st.st_mtime_ns])
    blob = {
        "plan": plan,
        "split": split,
        "fold": fold,
        "seed": seed,
        "training": {k: v for k, v in training.items() if k not in _NOT_FINGERPRINTED},
        "augmentation": augmentation,
        "inputs": files,
        "batch_streams": BATCH_STREAMS,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def sigterm_flag():
    """While training, SIGTERM only sets a flag; the loop checkpoints and stops at the next
    iteration boundary.  Outside the main thread the default handling is left alone."""
    flag: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield flag
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
