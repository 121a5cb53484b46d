"""The GPU rows of ``python -m benchmarks`` (``bash benchmarks/gpu.sh``), kitsnet vs nnU-Net on
the paper's 3d_fullres plan (``make_plan`` of config/kits21.yaml: 6 stages, 128^3, batch 2):

- ``gpu_train``, seconds per training iteration over the same synthetic cases of the paper's
  median fullres shape (528 x 512 x 512) with the same CPU worker count: kitsnet's own
  ``kitsnet.train.loop.train_fold`` as a training job calls it, two epochs, the second timed
  from its log; nnU-Net's network, loss, optimiser and ``train_step`` called unbound on a
  stand-in for its trainer, fed by its ``nnUNetDataLoader`` in ``NonDetMultiThreadedAugmenter``;
- ``gpu_window``: one sliding-window prediction of a 512^3 volume with the same weights,
  kitsnet's ``predict_volume`` and nnU-Net's ``predict_sliding_window_return_logits``.

Both report peak GPU memory.  Without CUDA they are skipped; ``--quick`` runs the same code at
tiny sizes on the CPU, CI's check of code that runs where nobody can debug it.
``KITSNET_GPU_BENCH`` (JSON) overrides settings, e.g. ``{"workers": 4, "compile": true}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from benchmarks.common import FULLRES, cached, paper_config, trainer_available
from benchmarks.inputs import PAINTED_FI, synthetic_case, write_cases

# --quick: the paper's plan shrunk to seconds on a CPU
QUICK_PLAN = dict(patch_size_3d=[32] * 3, n_stages_3d=3, base_features=4, max_features_3d=16)
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def settings(quick: bool) -> dict[str, Any]:
    """Everything both sides need; ``quick`` only shrinks the paper's plan and the sizes."""
    from kitsnet.plan.planner import make_plan

    cfg = paper_config()
    cfg["plan"].update(QUICK_PLAN if quick else {})
    fp = {"shapes": [[400, 512, 512]], "spacings": [FULLRES]}
    s = {
        "plan": make_plan("3d_fullres", {**fp, "foreground_intensity": PAINTED_FI}, cfg),
        **{k: cfg[k] for k in ("training", "augmentation", "inference")},
        "workers": 1 if quick else min(8, os.cpu_count() or 1),
        "cases": 2 if quick else 3,
        "case_shape": [48, 56, 56] if quick else [528, 512, 512],
        "iterations": 2 if quick else 100,  # kitsnet: per epoch of train_fold
        "warmup": 1 if quick else 15,  # nnU-Net: untimed iterations first
        "sw_shape": [32, 40, 32] if quick else [512, 512, 512],
        "channels_last": not quick,
        "compile": False,
        "seed": 0,
    }
    return {**s, **json.loads(os.environ.get("KITSNET_GPU_BENCH", "{}"))}


def setup_train(quick: bool) -> dict[str, Any]:
    """The settings and the cases (written once per size, cached in the temporary folder)."""
    s = settings(quick)
    plan, shape, cases = s["plan"], s["case_shape"], [f"case_{i:05d}" for i in range(s["cases"])]
    norm, key = plan["normalization"], f"{len(cases)}x{'x'.join(map(str, shape))}"
    root = cached("gpu", key, lambda r: write_cases(r, cases, shape, norm, plan["spacing"]))
    return {**s, "cases": cases, "kits_dir": root / "kitsnet", "nnunet_dir": root / "nnunet"}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _gpu_figures(res: dict[str, Any], net: torch.nn.Module) -> dict[str, Any]:
    """``res`` with the GPU, its peak memory and the network's size (the same on both sides)."""
    res["gpu"] = torch.cuda.get_device_name(0) if CUDA else "cpu"
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    res["parameters"] = sum(p.numel() for p in net.parameters())
    return res


def _kitsnet_net(plan: dict[str, Any]) -> torch.nn.Module:
    from kitsnet.model.network import build_network

    return build_network(plan["arch"], plan["in_channels"], plan["num_classes"])


def run_kitsnet_train(s: dict[str, Any]) -> dict[str, Any]:
    """``train_fold``, two epochs of ``iterations``: its log line ``epoch 0: ...`` ends the
    warm-up epoch (workers starting, cuDNN autotuning, compilation) and starts the clock,
    ``epoch 1: ...`` (its iterations and one validation batch later) stops it."""
    from kitsnet.train.loop import train_fold

    times: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"train_fold: {msg}", file=sys.stderr, flush=True)
        times.setdefault(str(msg).split(":")[0], time.perf_counter())

    plan, n, t_start = s["plan"], s["iterations"], time.perf_counter()
    keep = {k: s[k] for k in ("workers", "compile", "channels_last")}
    training = dict(s["training"], epochs=2, iterations_per_epoch=n, val_iterations=1, **keep)
    training.update(checkpoint_every=1000, device=DEVICE.type)
    splits = [{"train": s["cases"], "val": s["cases"][:1]}]
    with tempfile.TemporaryDirectory() as out:
        args = (plan, splits, 0, s["kits_dir"], out, training, s["augmentation"])
        train_fold(*args, seed=s["seed"], device=DEVICE.type, log=log)
        head, *_, last = (Path(out) / "training_log.csv").read_text().splitlines()
    if not {"epoch 0", "epoch 1"} <= set(times):
        raise RuntimeError(f"train_fold did not log two epochs: {list(times)}")
    t0, t1 = times["epoch 0"], times["epoch 1"]
    loss = float(dict(zip(head.split(","), last.split(","), strict=True))["train_loss"])
    res = {"iterations": n, "seconds": (t1 - t0) / n, "warmup_s": t0 - t_start}
    res.update(loss_last=loss, loss_finite=bool(np.isfinite(loss)))
    res["settings"] = {"autocast": "bf16" if CUDA else "off", **keep}
    with torch.device("meta"):
        return _gpu_figures(res, _kitsnet_net(plan))


def _nnunet_net(plan: dict[str, Any], deep_supervision: bool) -> torch.nn.Module:
    from tests.reference.nnunet_plans import nnunet_architecture, nnunet_network

    arch = nnunet_architecture(plan["arch"])
    return nnunet_network(arch, plan["in_channels"], plan["num_classes"], deep_supervision)


def _trainer_standin(s: dict[str, Any]) -> SimpleNamespace:
    """What nnUNetTrainer's methods read, set as its ``__init__`` and ``initialize`` set it
    (network, optimiser, loss, grad scaler), so that they can be called unbound on it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as T

    from tests.reference.nnunet_plans import dataset_json, plans_manager

    pm = plans_manager(s["plan"])
    tr = SimpleNamespace(plans_manager=pm, device=DEVICE, is_ddp=False)
    tr.enable_deep_supervision = True
    tr.configuration_manager = pm.get_configuration(s["plan"]["configuration"])
    tr.label_manager = pm.get_label_manager(dataset_json(len(s["cases"])))
    tr.initial_lr, tr.weight_decay, tr.num_epochs = 1e-2, 3e-5, 1000
    tr._do_i_compile = lambda: s["compile"] and CUDA
    tr._get_deep_supervision_scales = lambda: T._get_deep_supervision_scales(tr)
    tr.network = _nnunet_net(s["plan"], True).to(DEVICE)
    if tr._do_i_compile():
        tr.network = torch.compile(tr.network)
    tr.optimizer, tr.lr_scheduler = T.configure_optimizers(tr)
    tr.loss = T._build_loss(tr)
    tr.grad_scaler = torch.amp.GradScaler("cuda") if CUDA else None
    return tr


def run_nnunet_train(s: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's ``train_step`` on batches from its loader in ``workers`` processes."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as T

    from tests.reference.nnunet_plans import training_loader

    plan, n = s["plan"], s["workers"]
    torch.manual_seed(s["seed"])
    np.random.seed(s["seed"])
    torch.backends.cudnn.benchmark = True  # nnUNetv2_train sets it (run/run_training.py)
    tr = _trainer_standin(s)
    # its default oversampling (0.33); copy-on-write maps, as read-only ones crash nnU-Net on
    # cases this size (see numpy_dataset); its augmenter as get_dataloaders makes it (>= 1 worker)
    dl = training_loader(s["nnunet_dir"], s["cases"], plan, 0.33, copy_on_write=True)
    gen = NonDetMultiThreadedAugmenter(dl, None, max(n, 1), max(6, n // 2), None, CUDA, 0.002)
    tr.network.train()
    step = lambda: float(T.train_step(tr, next(gen))["loss"])  # noqa: E731
    try:  # untimed warm-up: cuDNN autotuning, compilation, workers starting
        t_warm = time.perf_counter()
        for _ in range(s["warmup"]):
            step()
        _sync()
        t0 = time.perf_counter()
        losses = [step() for _ in range(s["iterations"])]  # as many as kitsnet's timed epoch
        _sync()
        seconds = (time.perf_counter() - t0) / len(losses)
    finally:
        with contextlib.suppress(Exception):
            gen._finish()
    res = {"iterations": len(losses), "seconds": seconds, "warmup_s": t0 - t_warm}
    res.update(loss_last=losses[-1], loss_finite=bool(np.isfinite(losses).all()))
    autocast = "fp16+GradScaler" if CUDA else "off"
    res["settings"] = {"autocast": autocast, "workers": n, "compile": tr._do_i_compile()}
    return _gpu_figures(res, tr.network)


def setup_sw(quick: bool) -> dict[str, Any]:
    """The settings, a CT volume normalised as the plan says, and the network's weights."""
    from kitsnet.preprocess.case import normalize_ct

    s = settings(quick)
    image = normalize_ct(synthetic_case(s["sw_shape"])[0], s["plan"]["normalization"])
    torch.manual_seed(s["seed"])
    net = _kitsnet_net(s["plan"])
    net.deep_supervision = False
    return {**s, "image": image[None].astype(np.float32), "net": net.eval()}


def _window(s: dict[str, Any], net: Any, predict: Any, autocast: bool) -> tuple[Any, dict]:
    """A warm-up pass of ``net`` (cuDNN autotuning for the tile, under the autocast the
    prediction uses), then ``predict()`` timed: its output and its figures."""
    from kitsnet.predict.sliding_window import compute_steps

    plan, inference = s["plan"], s["inference"]
    with torch.no_grad(), torch.autocast(DEVICE.type, enabled=autocast):
        net(torch.zeros(1, plan["in_channels"], *plan["patch_size"], device=DEVICE))
    _sync()
    t0 = time.perf_counter()
    out = predict()
    _sync()
    seconds = time.perf_counter() - t0
    patch = list(plan["patch_size"])
    size = [max(a, p) for a, p in zip(s["sw_shape"], patch, strict=True)]
    tiles = int(np.prod([len(v) for v in compute_steps(size, patch, inference["step_size"])]))
    mirrors = 2 ** len(patch) if inference["mirror"] else 1
    res = {"seconds": seconds, "sw_shape": s["sw_shape"], "tiles": tiles, "mirrors": mirrors}
    return out, _gpu_figures(res, net)


def run_kitsnet_sw(s: dict[str, Any]) -> dict[str, Any]:
    """kitsnet's ``predict_volume``, as ``kitsnet predict`` calls it (no autocast)."""
    from kitsnet.predict.infer import predict_volume

    torch.backends.cudnn.benchmark = True
    net = s["net"].to(DEVICE)
    run = (s["image"], s["plan"], s["inference"], DEVICE)
    logits, res = _window(s, net, lambda: predict_volume([net], *run), False)
    res["finite"] = bool(np.isfinite(logits[:, ::7, ::7, ::7]).all())
    return {**res, "settings": {"autocast": "none", "output": "numpy on the host"}}


def run_nnunet_sw(s: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's ``predict_sliding_window_return_logits`` with kitsnet's weights."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from tests.reference.nnunet_plans import dataset_json, load_kitsnet_weights, plans_manager

    plan, inference = s["plan"], s["inference"]
    net = _nnunet_net(plan, False)
    load_kitsnet_weights(net, s["net"].state_dict())
    step, mirror = float(inference["step_size"]), bool(inference["mirror"])
    predictor = nnUNetPredictor(step, True, mirror, True, DEVICE, allow_tqdm=False)
    pm, axes = plans_manager(plan), tuple(range(len(plan["patch_size"])))
    cm = pm.get_configuration(plan["configuration"])
    predictor.manual_initialization(net, pm, cm, None, dataset_json(), "nnUNetTrainer", axes)
    x = torch.from_numpy(s["image"])
    predict = lambda: predictor.predict_sliding_window_return_logits(x)  # noqa: E731
    logits, res = _window(s, predictor.network.to(DEVICE), predict, CUDA)
    res["finite"] = bool(torch.isfinite(logits[:, ::7, ::7, ::7].float()).all())
    settings_ = {"autocast": "fp16" if CUDA else "off", "output": f"torch on {logits.device}"}
    return {**res, "settings": settings_}


def describe(f: dict[str, Any]) -> str:
    """One side's figures on one line (``-``: not measured, e.g. no GPU)."""
    if "tiles" in f:
        shape = "x".join(map(str, f["sw_shape"]))
        head = f"{f['seconds']:.2f} s, {shape}, {f['tiles']} tiles x {f['mirrors']} mirrors"
    else:
        head = f"{1 / f['seconds']:.2f} it/s ({f['iterations']} timed)"
    mem = "-" if f["peak_mem_gib"] is None else f"{f['peak_mem_gib']:.1f}"
    head += f", peak {mem} GiB on {f['gpu']}, {f['parameters']} weights"
    return f"{head}; " + ", ".join(f"{k}={v}" for k, v in f["settings"].items())


# the two rows as the harness reads a benchmark module
COMMON = {"NEEDS_CUDA": True, "MAX_RUNS": 1, "figures": dict, "describe": describe}
COMMON["peer_available"] = trainer_available
TRAIN = SimpleNamespace(WHAT="3d_fullres training, 128^3 x 2: seconds per iteration", **COMMON)
TRAIN.setup, TRAIN.run_kitsnet, TRAIN.run_peer = setup_train, run_kitsnet_train, run_nnunet_train
WINDOW = SimpleNamespace(WHAT="sliding window, 512^3, 3d_fullres network, 8 mirrors", **COMMON)
WINDOW.setup, WINDOW.run_kitsnet, WINDOW.run_peer = setup_sw, run_kitsnet_sw, run_nnunet_sw
