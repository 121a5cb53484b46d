"""The training loop of one configuration and fold: SGD with nnU-Net's poly schedule, CE + Dice
with deep supervision, per-epoch validation pseudo-Dice and its EMA, checkpoints and resume.

Every number comes from the plan (patch, batch, network, ``batch_dice``) or the ``training`` /
``augmentation`` sections of the config.  The pieces live beside it: the input pipeline in
:mod:`kitsnet.loader`, the augmentation in :mod:`kitsnet.augment`, the objective in
:mod:`kitsnet.loss`, checkpoints, resume and the SIGTERM stop in :mod:`kitsnet.checkpoint`.
``model_final.pt`` and ``model_best.pt`` are written at the end.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
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
from .device import amp_dtype, configure_backends, pick_device
from .io import atomic_path, remove_stale_temporaries
from .loader import find_previous_stage, input_files
from .loss import deep_supervision_weights, total_loss
from .network import build_network
from .pipeline import InputPipeline, batches, default_workers, epoch_keys

__all__ = [
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "LOG_COLUMNS",
    "TrainingInterrupted",
    "find_previous_stage",
    "load_checkpoint",
    "pick_device",
    "train_fold",
]

LOG_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "lr",
    "epoch_time_s",
]


def _write_log(history: list[dict], path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# ----------------------------------------------------------------------------- training
class _State:
    """What one fold's training carries from iteration to iteration and what a checkpoint holds:
    network, optimiser, the logged history, the EMA pseudo-Dice and the best model.  The batches
    draw from per-batch streams (:mod:`kitsnet.pipeline`), so no sampling state is carried; the
    torch seed fixes the network's initialisation."""

    def __init__(self, plan: dict, training: dict, seed: int, fold: int, dev: torch.device):
        torch.manual_seed(seed + fold)
        self.net = build_network(plan["arch"], plan["in_channels"], plan["num_classes"]).to(dev)
        self.opt = torch.optim.SGD(
            self.net.parameters(),
            lr=training["initial_lr"],
            momentum=training["momentum"],
            nesterov=training["nesterov"],
            weight_decay=training["weight_decay"],
        )
        # fp16 autocast (GPUs without bf16, e.g. the paper's V100s) needs loss scaling, as
        # nnU-Net's GradScaler; bf16 and float32 do not (the scaler is then a pass-through)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(dev) == torch.float16)
        self.history: list[dict] = []
        self.ema: float | None = None
        self.best, self.best_state, self.best_epochs = -math.inf, None, 0
        # position inside an epoch when the last checkpoint was written on SIGTERM
        self.partial: dict = {}

    def checkpoint(self, fingerprint: str, partial_epoch: dict | None = None) -> dict:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "history": json.dumps(self.history),
            "ema": self.ema,
            "best": self.best,
            "best_model": self.best_state,
            "best_epochs": self.best_epochs,
            "partial_epoch": json.dumps(partial_epoch) if partial_epoch else "",
            "torch_rng": torch.get_rng_state(),
            "grad_scaler": self.scaler.state_dict(),
            "fingerprint": fingerprint,
        }

    def restore(self, ck: dict) -> None:
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.history = json.loads(ck["history"])
        self.ema, self.best = ck["ema"], ck["best"]
        self.best_state, self.best_epochs = ck.get("best_model"), int(ck.get("best_epochs", 0))
        self.partial = json.loads(ck.get("partial_epoch") or "{}")
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("grad_scaler"):
            self.scaler.load_state_dict(ck["grad_scaler"])

    def end_epoch(self, record: dict, ema_alpha: float) -> None:
        """Log an epoch; its network becomes the best one when the EMA pseudo-Dice improved."""
        dice = record["pseudo_dice"]
        self.ema = dice if self.ema is None else ema_alpha * self.ema + (1 - ema_alpha) * dice
        self.history.append({**record, "ema_pseudo_dice": self.ema})
        if self.ema > self.best:
            self.best, self.best_epochs = self.ema, len(self.history)
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()
            }


def _memory_format(dim: int, dev: torch.device, training: dict) -> torch.memory_format:
    """Channels-last activations on a GPU (tensor-core convolutions without layout changes);
    the CPU keeps the contiguous layout."""
    if dev.type != "cuda" or not training.get("channels_last", True):
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 3 else torch.channels_last


class _Steps:
    """How a batch is trained on: the loss and its weights, the precision, the memory format
    and the (optionally compiled) forward, fixed by the plan and the config for the whole run.
    Losses and validation counts stay on the device until the epoch ends: no host sync per
    iteration."""

    def __init__(self, plan, training, pipeline: InputPipeline, state: _State, dev, log=print):
        arch = plan["arch"]
        self.pipeline, self.dev = pipeline, dev
        self.weights = deep_supervision_weights(
            len(arch["features_per_stage"]) - 1 if arch["deep_supervision"] else 1
        )
        self.batch_dice = bool(plan.get("batch_dice", True))
        self.num_classes, self.grad_clip = plan["num_classes"], training["grad_clip"]
        self.amp_dtype = amp_dtype(dev)
        self.fmt = _memory_format(int(arch["dim"]), dev, training)
        state.net.to(memory_format=self.fmt)
        self.forward = state.net
        if training.get("compile", False):
            self.forward = _compiled(state.net, log)
        self.log = log

    def _loss(self, net, x: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        # the loss inside autocast as nnU-Net; total_loss computes it in float32
        on = self.amp_dtype is not None
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=on):
            return total_loss(net(x), targets, self.weights, self.batch_dice)

    def step(self, state: _State, batch: dict) -> torch.Tensor:
        """One SGD step on a batch from the pipeline; returns its loss (on the device)."""
        x, targets = self.pipeline.finish(batch, self.dev)
        x = x.contiguous(memory_format=self.fmt)
        state.opt.zero_grad(set_to_none=True)
        try:
            loss = self._loss(self.forward, x, targets)
            state.scaler.scale(loss).backward()
        except Exception as exc:
            if self.forward is state.net:
                raise
            # torch.compile fails lazily, in the first forward or backward: eager from now on
            self.log(f"warning: torch.compile failed ({type(exc).__name__}: {exc}); eager mode")
            self.forward = state.net
            state.opt.zero_grad(set_to_none=True)
            loss = self._loss(self.forward, x, targets)
            state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), self.grad_clip)
        state.scaler.step(state.opt)
        state.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def validate(self, state: _State, val_batches: list[dict]) -> tuple[float, float]:
        """Validation loss and nnU-Net's pseudo-Dice (per-class TP/FP/FN summed over patches)."""
        state.net.eval()
        counts = torch.zeros(3, self.num_classes - 1, device=self.dev, dtype=torch.float64)
        losses = []
        for batch in val_batches:
            x, targets = self.pipeline.finish(batch, self.dev)
            x = x.contiguous(memory_format=self.fmt)
            on = self.amp_dtype is not None
            with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=on):
                out = state.net(x)
                losses.append(total_loss(out, targets, self.weights, self.batch_dice).detach())
            pred = (out[0] if isinstance(out, list | tuple) else out).argmax(1)
            y = targets[0][:, 0]
            for k in range(1, self.num_classes):
                p, t = pred == k, y == k
                counts[0, k - 1] += (p & t).sum()
                counts[1, k - 1] += (p & ~t).sum()
                counts[2, k - 1] += (~p & t).sum()
        state.net.train()
        tp, fp, fn = counts.cpu().numpy()
        denom = 2 * tp + fp + fn
        dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
        loss = float(torch.stack(losses).float().mean()) if losses else math.nan
        return loss, float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0


def _compiled(net: torch.nn.Module, log):
    """``training.compile``: torch.compile of the network, or the network itself (with a
    warning) where compilation is not available."""
    try:
        return torch.compile(net)
    except Exception as exc:
        log(f"warning: torch.compile unavailable ({type(exc).__name__}: {exc}); eager mode")
        return net


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

    Resumes from the checkpoints in ``out_dir`` when they exist (:mod:`kitsnet.checkpoint`);
    raises :class:`TrainingInterrupted` after checkpointing when SIGTERM arrives.  The device
    is checked first: ``device: cuda`` without a usable GPU fails before anything is written."""
    dev = pick_device(device)
    configure_backends(dev)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = splits[fold]
    prev = [Path(d) for d in prev_dirs] if prev_dirs else None
    state = _State(plan, training, seed, fold, dev)
    inputs = input_files(split["train"] + split["val"], data_dir, prev, bool(plan.get("roi")))
    fingerprint = settings_fingerprint(plan, split, fold, seed, training, augmentation, inputs)
    for name in ("model_final.pt", "model_best.pt", "training_log.csv"):
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
    steps = _Steps(plan, training, pipeline, state, dev, log)

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
        ("model_best.pt", state.best_state, state.best_epochs),
        ("model_final.pt", state.net.state_dict(), len(state.history)),
    ):
        save_torch(
            {"state_dict": weights, "plan": json.dumps(plan), "fold": fold, "epochs": n},
            out_dir / name,
        )
    return {"epochs": len(state.history), "best_ema_pseudo_dice": state.best}


def _run_epoch(epoch, state, steps: _Steps, stream, training, stop, save_checkpoint, out_dir, log):
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
    _write_log(state.history, out_dir / "training_log.csv")
    last = epoch + 1 == epochs
    if (epoch + 1) % int(training["checkpoint_every"]) == 0 or last or stop["signal"] is not None:
        save_checkpoint(epoch)
    if stop["signal"] is not None and epoch + 1 < epochs:
        raise TrainingInterrupted(
            f"{out_dir}: stopped by signal {stop['signal']} after epoch {epoch}; "
            "checkpoint written, rerun to resume"
        )
    fault_point("between_epochs", epoch=epoch)
