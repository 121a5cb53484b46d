"""How one fold's training steps: the state it carries from iteration to iteration (network,
optimiser, history, EMA, best model) and the code that trains on a batch and validates.

:func:`kitsnet.train.loop.train_fold` builds one :class:`TrainingState` and one
:class:`TrainingSteps` per run and drives them epoch by epoch; they are public so that a
benchmark can time the very step code the workflow runs (``benchmarks/bench_train_input.py``)
without running the loop around it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import torch

from kitsnet.core.device import amp_dtype
from kitsnet.core.regions import output_channels, plan_regions
from kitsnet.model.network import build_network
from kitsnet.train.loss import deep_supervision_weights, region_targets, total_loss
from kitsnet.train.pipeline import InputPipeline

__all__ = ["TrainingState", "TrainingSteps", "compiled_network", "memory_format_for"]


class TrainingState:
    """What one fold's training carries from iteration to iteration and what a checkpoint holds:
    network, optimiser, the logged history, the EMA pseudo-Dice and the best model.  The
    batches draw from per-batch streams (:mod:`kitsnet.train.pipeline`), so no sampling state
    is carried; the torch seed fixes the network's initialisation."""

    def __init__(self, plan: dict, training: dict, seed: int, fold: int, dev: torch.device) -> None:
        torch.manual_seed(seed + fold)
        self.net = build_network(plan["arch"], plan["in_channels"], output_channels(plan)).to(dev)
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
        """Everything a resumed run needs to continue bit-identically (RNG and loss scaler
        included), tagged with the settings ``fingerprint`` so other settings start over;
        ``partial_epoch`` is the position inside an epoch when SIGTERM stopped it."""
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
        """The state of checkpoint ``ck`` (:meth:`checkpoint`); keys added later are optional,
        so checkpoints of older runs still load."""
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


def memory_format_for(dim: int, dev: torch.device, training: dict) -> torch.memory_format:
    """Channels-last activations on a GPU (tensor-core convolutions without layout changes);
    the CPU keeps the contiguous layout."""
    if dev.type != "cuda" or not training.get("channels_last", True):
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 3 else torch.channels_last


class TrainingSteps:
    """How a batch is trained on: the loss and its weights, the precision, the memory format
    and the (optionally compiled) forward, fixed by the plan and the config for the whole run.
    Losses and validation counts stay on the device until the epoch ends: no host sync per
    iteration."""

    def __init__(
        self,
        plan: dict,
        training: dict,
        pipeline: InputPipeline,
        state: TrainingState,
        dev: torch.device,
        log: Callable[[str], object] = print,
    ) -> None:
        arch = plan["arch"]
        self.pipeline, self.dev = pipeline, dev
        self.weights = deep_supervision_weights(
            len(arch["features_per_stage"]) - 1 if arch["deep_supervision"] else 1
        )
        self.batch_dice = bool(plan.get("batch_dice", True))
        self.num_classes, self.grad_clip = plan["num_classes"], training["grad_clip"]
        found = plan_regions(plan)
        self.regions = found[0] if found else None
        self.amp_dtype = amp_dtype(dev)
        self.fmt = memory_format_for(int(arch["dim"]), dev, training)
        state.net.to(memory_format=self.fmt)
        self.forward = state.net
        if training.get("compile", False):
            self.forward = compiled_network(state.net, log)
        self.log = log

    def _loss(
        self, net: Callable[[torch.Tensor], object], x: torch.Tensor, targets: list[torch.Tensor]
    ) -> torch.Tensor:
        # the loss inside autocast as nnU-Net; total_loss computes it in float32
        on = self.amp_dtype is not None
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=on):
            return total_loss(net(x), targets, self.weights, self.batch_dice, self.regions)

    def step(self, state: TrainingState, batch: dict) -> torch.Tensor:
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
    def validate(self, state: TrainingState, val_batches: list[dict]) -> tuple[float, float]:
        """Validation loss and nnU-Net's pseudo-Dice (per-class TP/FP/FN summed over patches;
        per region, of the sigmoids above 0.5, for a region-based plan)."""
        state.net.eval()
        n = len(self.regions) if self.regions else self.num_classes - 1
        counts = torch.zeros(3, n, device=self.dev, dtype=torch.float64)
        losses = []
        for batch in val_batches:
            x, targets = self.pipeline.finish(batch, self.dev)
            x = x.contiguous(memory_format=self.fmt)
            on = self.amp_dtype is not None
            with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=on):
                out = state.net(x)
                loss = total_loss(out, targets, self.weights, self.batch_dice, self.regions)
                losses.append(loss.detach())
            self._count(out[0] if isinstance(out, list | tuple) else out, targets[0], counts)
        state.net.train()
        tp, fp, fn = counts.cpu().numpy()
        denom = 2 * tp + fp + fn
        dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
        loss = float(torch.stack(losses).float().mean()) if losses else math.nan
        return loss, float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0

    def _count(self, out: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch's TP, FP, FN per class (arg-max) or per region (logit > 0, nnU-Net's
        sigmoid > 0.5) to ``counts``; ``labels`` is (B, 1, *S)."""
        if self.regions:
            pred, truth = out > 0, region_targets(labels, self.regions) > 0
            axes = [0, *range(2, out.ndim)]
            counts[0] += (pred & truth).sum(axes)
            counts[1] += (pred & ~truth).sum(axes)
            counts[2] += (~pred & truth).sum(axes)
            return
        pred, y = out.argmax(1), labels[:, 0]
        for k in range(1, self.num_classes):
            p, t = pred == k, y == k
            counts[0, k - 1] += (p & t).sum()
            counts[1, k - 1] += (p & ~t).sum()
            counts[2, k - 1] += (~p & t).sum()


def compiled_network(
    net: torch.nn.Module, log: Callable[[str], object]
) -> Callable[[torch.Tensor], object]:
    """``training.compile``: torch.compile of the network, or the network itself (with a
    warning) where compilation is not available."""
    try:
        return torch.compile(net)
    except Exception as exc:
        log(f"warning: torch.compile unavailable ({type(exc).__name__}: {exc}); eager mode")
        return net
