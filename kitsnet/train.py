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

from .augment import augment_batch, cascade_binary_ops, remove_random_components
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
from .io import atomic_path, remove_stale_temporaries
from .loader import (
    CASE_FILES,
    CaseStore,
    PatchSampler,
    augment_settings,
    find_previous_stage,
    region_size,
)
from .loss import deep_supervision_weights, total_loss
from .network import build_network

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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(dev: torch.device) -> torch.dtype | None:
    """Autocast precision of training on ``dev``: bf16 on GPUs that have it, else fp16 (with
    loss scaling); None (float32) on the CPU."""
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- training
class _State:
    """What one fold's training carries from iteration to iteration and what a checkpoint holds:
    network, optimiser, random streams, the logged history, the EMA pseudo-Dice and the best
    model.  Seeding happens here, in a fixed order, so a seed reproduces a run exactly."""

    def __init__(self, plan: dict, training: dict, seed: int, fold: int, dev: torch.device):
        torch.manual_seed(seed + fold)
        self.rng = np.random.default_rng([seed, fold])
        self.gen = torch.Generator().manual_seed(seed * 1000 + fold)
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
            "gen_rng": self.gen.get_state(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
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
        self.gen.set_state(ck["gen_rng"])
        self.rng.bit_generator.state = json.loads(ck["numpy_rng"])
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


class _Steps:
    """How one batch is made and trained on: the samplers, the augmentation, the loss and
    the precision, all fixed by the plan and the config for the whole run."""

    def __init__(self, plan, training, augmentation, stores, state: _State, dev):
        arch, dim = plan["arch"], int(plan["arch"]["dim"])
        self.patch, self.dev = list(plan["patch_size"]), dev
        self.augmentation, self.aug = augmentation, augment_settings(augmentation, dim)
        over = training["oversample_foreground"]
        region = region_size(self.patch, augmentation, dim)
        self.train = PatchSampler(stores[0], region, self.patch, dim, over, state.rng)
        self.val = PatchSampler(stores[1], self.patch, self.patch, dim, over, state.rng)
        self.weights = deep_supervision_weights(
            len(arch["features_per_stage"]) - 1 if arch["deep_supervision"] else 1
        )
        self.batch, self.batch_dice = int(plan["batch_size"]), bool(plan.get("batch_dice", True))
        self.n_prev = plan["num_classes"] - 1 if plan.get("previous_stage") else 0
        self.num_classes, self.grad_clip = plan["num_classes"], training["grad_clip"]
        self.val_iterations = int(training["val_iterations"])
        self.amp_dtype = amp_dtype(dev)

    def step(self, state: _State) -> float:
        """One SGD step on a freshly sampled and augmented batch; returns its loss."""
        img, seg = self.train.sample(self.batch, self.n_prev)
        # Sampled on the CPU, augmented where the network runs: on a GPU the batched
        # transforms take milliseconds, so training is bounded by the GPU, not by CPU
        # workers (nnU-Net's ~40% GPU utilisation with CPU augmentation).
        img_t, seg_t = augment_batch(
            torch.from_numpy(img).to(self.dev),
            torch.from_numpy(seg).to(self.dev),
            self.patch,
            self.aug,
            state.gen,
            n_intensity_channels=img.shape[1] - self.n_prev,
        )
        if self.n_prev:
            img_t[:, -self.n_prev :] = _augment_previous_stage(
                img_t[:, -self.n_prev :], self.augmentation, state.gen
            )
        state.opt.zero_grad(set_to_none=True)
        # the loss inside autocast as nnU-Net; total_loss computes it in float32
        on = self.amp_dtype is not None
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=on):
            loss = total_loss(state.net(img_t), seg_t.long(), self.weights, self.batch_dice)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), self.grad_clip)
        state.scaler.step(state.opt)
        state.scaler.update()
        return float(loss.detach())

    def validate(self, state: _State) -> tuple[float, float]:
        return _validate(
            state.net,
            self.val,
            self.batch,
            self.n_prev,
            self.val_iterations,
            self.weights,
            self.batch_dice,
            self.dev,
            self.num_classes,
        )


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
    raises :class:`TrainingInterrupted` after checkpointing when SIGTERM arrives."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    split = splits[fold]
    prev = [Path(d) for d in prev_dirs] if prev_dirs else None
    stores = (CaseStore(split["train"], data_dir, prev), CaseStore(split["val"], data_dir, prev))
    state = _State(plan, training, seed, fold, dev)
    inputs = [data_dir / f"{c}{x}" for c in split["train"] + split["val"] for x in CASE_FILES]
    if prev:
        inputs += [find_previous_stage(c, prev) for c in split["train"] + split["val"]]
    fingerprint = settings_fingerprint(plan, split, fold, seed, training, augmentation, inputs)
    for name in ("model_final.pt", "model_best.pt", "training_log.csv"):
        remove_stale_temporaries(out_dir / name)  # left by a killed run
    ck = load_resumable_checkpoint(out_dir, fingerprint, log)
    if ck is not None:
        state.restore(ck)
        where = f", iteration {state.partial['iteration']}" if state.partial else ""
        log(f"resumed from {ck['_path']} after epoch {len(state.history)}{where}")
    del ck
    steps = _Steps(plan, training, augmentation, stores, state, dev)

    def save_checkpoint(epoch: int, partial_epoch: dict | None = None) -> None:
        save_checkpoint_file(
            state.checkpoint(fingerprint, partial_epoch),
            out_dir / CHECKPOINT,
            out_dir / PREVIOUS_CHECKPOINT,
            epoch,
        )

    with sigterm_flag() as stop:
        for epoch in range(len(state.history), int(training["epochs"])):
            _run_epoch(epoch, state, steps, training, stop, save_checkpoint, out_dir, log)
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


def _run_epoch(epoch, state: _State, steps: _Steps, training, stop, save_checkpoint, out_dir, log):
    """Train one epoch (from where a SIGTERM checkpoint left it), validate, log, checkpoint."""
    epochs, n_iter = int(training["epochs"]), int(training["iterations_per_epoch"])
    resume = state.partial if state.partial.get("epoch") == epoch else {}
    t0 = time.perf_counter() - float(resume.get("elapsed_s", 0.0))
    lr = training["initial_lr"] * (1 - epoch / epochs) ** training["poly_exponent"]
    for g in state.opt.param_groups:
        g["lr"] = lr
    state.net.train()
    losses = list(resume.get("losses", []))
    for it in range(int(resume.get("iteration", 0)), n_iter):
        losses.append(steps.step(state))
        fault_point("after_iteration", epoch=epoch, iteration=it)
        if stop["signal"] is not None and it + 1 < n_iter:
            elapsed = time.perf_counter() - t0
            position = {"epoch": epoch, "iteration": it + 1, "losses": losses, "elapsed_s": elapsed}
            save_checkpoint(epoch, position)
            raise TrainingInterrupted(
                f"{out_dir}: stopped by signal {stop['signal']} in epoch {epoch} after "
                f"iteration {it}; checkpoint written, rerun to resume"
            )
    val_loss, dice = steps.validate(state)
    record = {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
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


def _augment_previous_stage(onehot: torch.Tensor, aug: dict, gen: torch.Generator) -> torch.Tensor:
    """nnU-Net's cascade augmentation of the lowres segmentation channels: random binary
    morphology and random removal of small connected components, so the fullres network learns
    not to trust the previous stage blindly."""
    onehot = cascade_binary_ops(
        onehot,
        gen,
        p=aug.get("cascade_binary_p", 0.4),
        p_per_label=aug.get("cascade_binary_p_per_label", 0.5),
        radius=aug.get("cascade_binary_radius", (1, 8)),
    )
    return remove_random_components(
        onehot,
        gen,
        p=aug.get("cascade_cc_removal_p", 0.2),
        p_per_label=aug.get("cascade_cc_p_per_label", 0.5),
        max_fraction=aug.get("cascade_cc_max_fraction", 0.15),
    )


@torch.no_grad()
def _validate(net, sampler, batch, n_prev, iterations, weights, batch_dice, dev, n_classes):
    """Validation loss and nnU-Net's pseudo-Dice (per-class TP/FP/FN summed over patches)."""
    net.eval()
    dtype = amp_dtype(dev)
    tp = np.zeros(n_classes - 1)
    fp, fn, losses = tp.copy(), tp.copy(), []
    for _ in range(iterations):
        img, seg = sampler.sample(batch, n_prev)
        x, y = torch.from_numpy(img).to(dev), torch.from_numpy(seg).to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = net(x)
            losses.append(float(total_loss(out, y, weights, batch_dice)))
        pred = (out[0] if isinstance(out, list | tuple) else out).argmax(1)
        for k in range(1, n_classes):
            p, t = pred == k, y[:, 0] == k
            tp[k - 1] += float((p & t).sum())
            fp[k - 1] += float((p & ~t).sum())
            fn[k - 1] += float((~p & t).sum())
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return float(np.mean(losses)), float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
