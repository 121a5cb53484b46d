"""The training loop of one configuration and fold: SGD with nnU-Net's poly schedule, CE + Dice
with deep supervision, per-epoch validation pseudo-Dice and its EMA, checkpoints and resume.

Every number comes from the plan (patch, batch, network, ``batch_dice``) or the ``training`` /
``augmentation`` sections of the config.  The pieces live beside it: the input pipeline in
:mod:`kitsnet.train.loader`, the augmentation in :mod:`kitsnet.train.augment`, the objective in
:mod:`kitsnet.train.loss`, the training state and the step and validation code in
:mod:`kitsnet.train.steps`, the log in :mod:`kitsnet.train.training_log`, checkpoints, resume
and the SIGTERM stop in :mod:`kitsnet.model.checkpoint`.  ``model_final.pt`` and
``model_best.pt`` are written at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from kitsnet.core.device import configure_backends, pick_device
from kitsnet.core.io import remove_stale_temporaries
from kitsnet.model.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    TrainingInterrupted,
    fault_point,
    load_checkpoint,
    load_resumable_checkpoint,
    save_checkpoint_file,
    save_torch,
    settings_fingerprint,
    sigterm_flag,
)
from kitsnet.stages import BEST_MODEL, FINAL_MODEL, find_previous_stage
from kitsnet.train.loader import input_files
from kitsnet.train.pipeline import InputPipeline, batches, default_workers, epoch_keys
from kitsnet.train.steps import TrainingState, TrainingSteps
from kitsnet.train.training_log import TRAINING_LOG, write_training_log

__all__ = [
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "TrainingInterrupted",
    "find_previous_stage",
    "load_checkpoint",
    "pick_device",
    "train_fold",
]


def _workers(training: dict, dev: torch.device) -> int:
    value = training.get("workers", "auto")
    if value == "auto":
        return default_workers(int(training.get("threads", 1)))
    return int(value)


def _augment_in_workers(training: dict, dev: torch.device) -> bool:
    where = training.get("augment_on", "auto")
    if where == "auto":
        return dev.type != "cuda"
    return where == "workers"


def train_fold(
    plan: dict,
    splits: list[dict],
    fold: int,
    data_dir: str | Path,
    out_dir: str | Path,
    training: dict,
    augmentation: dict,
    prev_dirs: list[str | Path] | None = None,
    seed: int = 0,
    device: str = "auto",
    log=print,
) -> dict:
    """Train one configuration on one fold; writes model_final.pt, model_best.pt,
    checkpoint_latest.pt (+ checkpoint_previous.pt) and training_log.csv into ``out_dir``.

    Resumes from the checkpoints in ``out_dir`` when they exist (:mod:`kitsnet.model.checkpoint`);
    raises :class:`TrainingInterrupted` after checkpointing when SIGTERM arrives.  The device
    is checked first: ``device: cuda`` without a usable GPU fails before anything is written."""
    dev = pick_device(device)
    configure_backends(dev)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = splits[fold]
    prev = [Path(d) for d in prev_dirs] if prev_dirs else None
    state = TrainingState(plan, training, seed, fold, dev)
    inputs = input_files(split["train"] + split["val"], data_dir, prev, bool(plan.get("roi")))
    fingerprint = settings_fingerprint(plan, split, fold, seed, training, augmentation, inputs)
    for name in (FINAL_MODEL, BEST_MODEL, TRAINING_LOG):
        remove_stale_temporaries(out_dir / name)  # left by a killed run
    ck = load_resumable_checkpoint(out_dir, fingerprint, log)
    if ck is not None:
        state.restore(ck)
        where = f", iteration {state.partial['iteration']}" if state.partial else ""
        log(f"resumed from {ck['_path']} after epoch {len(state.history)}{where}")
    del ck
    pipeline = InputPipeline(
        plan,
        training,
        augmentation,
        split,
        data_dir,
        prev,
        seed,
        fold,
        augment_in_workers=_augment_in_workers(training, dev),
    )
    steps = TrainingSteps(plan, training, pipeline, state, dev, log)

    def save_checkpoint(epoch: int, partial_epoch: dict | None = None) -> None:
        save_checkpoint_file(
            state.checkpoint(fingerprint, partial_epoch),
            out_dir / CHECKPOINT,
            out_dir / PREVIOUS_CHECKPOINT,
            epoch,
        )

    first = len(state.history)
    n_iter, n_val = int(training["iterations_per_epoch"]), int(training["val_iterations"])
    keys = []
    for epoch in range(first, int(training["epochs"])):
        start = int(state.partial.get("iteration", 0)) if state.partial.get("epoch") == epoch else 0
        keys += epoch_keys(epoch, start, n_iter, n_val)
    stream = batches(pipeline, keys, _workers(training, dev), pin_memory=dev.type == "cuda")
    with sigterm_flag() as stop, stream:
        for epoch in range(first, int(training["epochs"])):
            _run_epoch(epoch, state, steps, stream, training, stop, save_checkpoint, out_dir, log)
    if state.best_state is None:  # no epoch improved on -inf: only if there were no epochs
        state.best_state, state.best_epochs = state.net.state_dict(), len(state.history)
    for name, weights, n in (
        (BEST_MODEL, state.best_state, state.best_epochs),
        (FINAL_MODEL, state.net.state_dict(), len(state.history)),
    ):
        save_torch(
            {"state_dict": weights, "plan": json.dumps(plan), "fold": fold, "epochs": n},
            out_dir / name,
        )
    return {"epochs": len(state.history), "best_ema_pseudo_dice": state.best}


def _run_epoch(
    epoch: int,
    state: TrainingState,
    steps: TrainingSteps,
    stream: Iterator[dict],
    training: dict,
    stop: dict,
    save_checkpoint: Callable[..., None],
    out_dir: Path,
    log: Callable[[str], object],
) -> None:
    """Train one epoch (from where a SIGTERM checkpoint left it), validate, log, checkpoint."""
    epochs, n_iter = int(training["epochs"]), int(training["iterations_per_epoch"])
    resume = state.partial if state.partial.get("epoch") == epoch else {}
    t0 = time.perf_counter() - float(resume.get("elapsed_s", 0.0))
    lr = training["initial_lr"] * (1 - epoch / epochs) ** training["poly_exponent"]
    for g in state.opt.param_groups:
        g["lr"] = lr
    state.net.train()
    done = list(resume.get("losses", []))
    losses: list[torch.Tensor] = []
    for it in range(int(resume.get("iteration", 0)), n_iter):
        losses.append(steps.step(state, next(stream)))
        fault_point("after_iteration", epoch=epoch, iteration=it)
        if stop["signal"] is not None and it + 1 < n_iter:
            elapsed = time.perf_counter() - t0
            done += [float(v) for v in losses]
            position = {"epoch": epoch, "iteration": it + 1, "losses": done, "elapsed_s": elapsed}
            save_checkpoint(epoch, position)
            raise TrainingInterrupted(
                f"{out_dir}: stopped by signal {stop['signal']} in epoch {epoch} after "
                f"iteration {it}; checkpoint written, rerun to resume"
            )
    val_loss, dice = steps.validate(
        state, [next(stream) for _ in range(int(training["val_iterations"]))]
    )
    train_losses = done + (torch.stack(losses).float().cpu().tolist() if losses else [])
    record = {
        "epoch": epoch,
        "train_loss": float(np.mean(train_losses)),
        "val_loss": val_loss,
        "pseudo_dice": dice,
        "lr": lr,
        "epoch_time_s": time.perf_counter() - t0,
    }
    state.end_epoch(record, training["ema_alpha"])
    log(
        f"epoch {epoch}: train {record['train_loss']:.4f} val {val_loss:.4f} dice {dice:.4f} "
        f"ema {state.ema:.4f} ({record['epoch_time_s']:.1f}s)"
    )
    write_training_log(state.history, out_dir / TRAINING_LOG)
    last = epoch + 1 == epochs
    if (epoch + 1) % int(training["checkpoint_every"]) == 0 or last or stop["signal"] is not None:
        save_checkpoint(epoch)
    if stop["signal"] is not None and epoch + 1 < epochs:
        raise TrainingInterrupted(
            f"{out_dir}: stopped by signal {stop['signal']} after epoch {epoch}; "
            "checkpoint written, rerun to resume"
        )
    fault_point("between_epochs", epoch=epoch)
