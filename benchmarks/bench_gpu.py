"""GPU benchmark: training iterations/s of kitsnet and nnU-Net, GPU and model FLOP utilisation,
and the sliding-window time of a full-size case, in one table (``benchmarks/gpu.sh``).

Run on one H100/H200 with ``bash benchmarks/gpu.sh`` (under 8 minutes), or without a GPU with
``bash benchmarks/gpu.sh --smoke`` (same code paths on the CPU with a tiny network; CI runs it).

The script is meant to be run once, by someone else, on a machine where it cannot be debugged,
so it is defensive by construction:

* every measured part runs in its own child process (``--child PART``) in its own session, under
  a timeout; a crash, a CUDA error or a hang in one part (a data-loader worker that never
  returns, say) costs that row only, and the child's whole process tree is killed;
* the parent keeps a global time budget and skips what no longer fits, with the reason;
* the JSON (``<out-dir>/gpu-<timestamp>.json``) is rewritten after every part, so even a
  SIGKILL of the whole run leaves the parts already measured on disk; SIGTERM (``timeout``)
  kills the running child, then writes the JSON and the table.

What is measured (both sides get the same network, patch, batch, data and CPU worker count):

1. ``kitsnet_train``: the workflow's own training function, ``kitsnet.train.train_fold``, as a
   training job calls it, on the paper's 3d_fullres plan (6 stages, 128^3 from a 205^3 region,
   batch 2) over memory-mapped real-size synthetic cases (528 x 512 x 512, the paper's median
   fullres shape): its input pipeline with N workers (``kitsnet.pipeline``: uint8 labels,
   pinned memory, augmentation on the GPU), bf16 autocast, channels-last 3D
   (``--no-channels-last`` to disable), cuDNN autotuning, optional ``--compile``.  Two epochs of
   ``--iterations`` (default 100); the second is timed from train_fold's own log lines.
2. ``nnunet_train``: nnU-Net v2's own pieces -- the network from its plans
   (``build_network_architecture``), ``_build_loss`` (DeepSupervisionWrapper(DC_and_CE_loss)),
   ``configure_optimizers``, ``get_training_transforms`` in ``nnUNetDataLoader`` inside
   ``NonDetMultiThreadedAugmenter`` with N processes, and its ``train_step`` (fp16 autocast +
   GradScaler), called unbound on a minimal stand-in for the trainer so that no nnUNet_raw /
   preprocessed / results layout and no plans file are needed.
3. GPU utilisation (``nvidia-smi`` every 0.5 s during the timed window) and model FLOP
   utilisation: forward FLOPs of one batch (``FlopCounterMode`` on the meta device), x3 for
   training, per second, over the GPU's dense bf16 peak.
4. ``kitsnet_sw`` / ``nnunet_sw``: one sliding-window prediction (patch 128^3, step 0.5, 8
   mirrors) of a full-size volume (default 512^3) with the same weights: kitsnet's
   ``predict_volume`` as ``kitsnet predict`` calls it, nnU-Net's
   ``predict_sliding_window_return_logits``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import nnunet_architecture

REPO = Path(__file__).resolve().parents[1]
PARTS = ("kitsnet_train", "nnunet_train", "kitsnet_sw", "nnunet_sw")
LABEL = {
    "kitsnet_train": "kitsnet train",
    "nnunet_train": "nnU-Net train",
    "kitsnet_sw": "kitsnet sliding window",
    "nnunet_sw": "nnU-Net sliding window",
}
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from NVIDIA's data sheets; the first
# substring found in torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)
# Part timeouts (s) beyond the measured window; a part is skipped when less than MIN_PART_S of
# the global budget is left.
MIN_PART_S = 20.0


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- settings
def settings(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the children need, decided once in the parent and written to setup.json.

    The plan is ``kitsnet.plan.make_plan('3d_fullres', ...)`` of config/kits21.yaml (the
    paper's 128^3 patch, batch 2, 6 stages 30 -> 320 by nnU-Net's rule); smoke mode only
    shrinks it.
    """
    import yaml

    from kitsnet.plan import make_plan

    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "kits21.yaml").read_text()))
    if smoke:
        cfg["plan"].update(
            patch_size_3d=[32, 32, 32], n_stages_3d=3, base_features=4, max_features_3d=16
        )
    fi = {"mean": 100.0, "std": 75.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}
    fp = {"shapes": [[400, 512, 512]], "spacings": [[0.78, 0.78, 0.78]], "foreground_intensity": fi}
    plan = make_plan("3d_fullres", fp, cfg)
    workers = args.workers if args.workers is not None else (1 if smoke else min(8, os.cpu_count()))
    # the paper's median 3d_fullres case (528 x 512 x 512 voxels at 0.78 mm)
    case_shape = [48, 56, 56] if smoke else [528, 512, 512]
    sw_shape = args.sw_shape or ([32, 40, 32] if smoke else [512, 512, 512])
    return {
        "smoke": smoke,
        "plan": plan,
        "training": cfg["training"],
        "augmentation": cfg["augmentation"],
        "inference": cfg["inference"],
        "workers": int(workers),
        "cases": [f"case_{i:05d}" for i in range(2 if smoke else 3)],
        "iterations": args.iterations or (2 if smoke else 100),
        "case_shape": case_shape,
        "sw_shape": [int(s) for s in sw_shape],
        "warmup_iters": 1 if smoke else 15,
        "seconds": args.seconds if args.seconds is not None else (0.0 if smoke else 50.0),
        "min_iters": 2 if smoke else 10,
        "max_iters": 3 if smoke else 100000,
        "channels_last": (not smoke) and not args.no_channels_last,
        "compile": bool(args.compile),
        "seed": 0,
    }


def part_timeout(part: str, s: dict) -> float:
    """Seconds a part may take: imports, CUDA start, warm-up (cuDNN autotuning), the window."""
    if s["smoke"]:
        return 60.0
    compile_s = 240.0 if s["compile"] else 0.0
    if part == "kitsnet_train":  # two epochs of train_fold, at >= 2.5 it/s
        return 120.0 + 2 * s["iterations"] * 0.4 + compile_s
    if part.endswith("_train"):
        return s["seconds"] + 120.0 + compile_s
    return 150.0 + compile_s


# ----------------------------------------------------------------------------- synthetic data
def _ellipsoid(seg: np.ndarray, img: np.ndarray, centre, radii, label: int, value: float) -> None:
    """Paint an ellipsoid into seg/img, computing only inside its bounding box (fast)."""
    lo = [max(int(c - r), 0) for c, r in zip(centre, radii, strict=True)]
    hi = [min(int(c + r) + 1, n) for c, r, n in zip(centre, radii, seg.shape, strict=True)]
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    seg[box][inside] = label
    img[box][inside] = value + 0.3 * img[box][inside]


def make_cases(s: dict, root: Path) -> dict[str, str]:
    """Write synthetic preprocessed cases in kitsnet's layout and in nnU-Net's.

    kitsnet (``kits/``): ``<case>_image.npy`` (1, *S) float32, ``<case>_seg.npy`` (*S) uint8,
    ``<case>.json`` with ``class_locations``.  nnU-Net (``nnunet/``): the same image (a
    symlink), ``<case>_seg.npy`` (1, *S) int8 and ``<case>.pkl`` with class locations as
    (N, 4) arrays, as its DefaultPreprocessor writes them.  Content: CT-like noise with two
    kidneys, a tumour and a cyst, so foreground oversampling has all three classes.
    """
    import pickle

    from kitsnet.io import save_json
    from kitsnet.preprocess import class_locations

    kits, nn = root / "kits", root / "nnunet"
    kits.mkdir(parents=True, exist_ok=True)
    nn.mkdir(parents=True, exist_ok=True)
    shape = s["case_shape"]
    for i, case in enumerate(s["cases"]):
        rng = np.random.default_rng([s["seed"], i])
        img = rng.standard_normal(shape, dtype=np.float32)
        seg = np.zeros(shape, np.uint8)
        z, y, x = shape
        kr = [z * 0.18, y * 0.12, x * 0.1]
        for side in (0.3, 0.7):
            _ellipsoid(seg, img, [z * 0.5, y * 0.55, x * side], kr, 1, 1.5)
        _ellipsoid(seg, img, [z * 0.45, y * 0.55, x * 0.3], [r * 0.45 for r in kr], 2, 2.5)
        _ellipsoid(seg, img, [z * 0.6, y * 0.58, x * 0.7], [r * 0.3 for r in kr], 3, 0.5)
        np.save(kits / f"{case}_image.npy", img[None])
        np.save(kits / f"{case}_seg.npy", seg)
        locs = class_locations(seg, rng)
        save_json({"shape": shape, "class_locations": locs}, kits / f"{case}.json")
        try:
            os.symlink(kits / f"{case}_image.npy", nn / f"{case}.npy")
        except OSError:
            shutil.copyfile(kits / f"{case}_image.npy", nn / f"{case}.npy")
        np.save(nn / f"{case}_seg.npy", seg[None].astype(np.int8))
        nn_locs = {
            int(k): np.array([[0, *c] for c in v], dtype=np.int64).reshape(-1, 4)
            for k, v in locs.items()
        }
        props = {"class_locations": nn_locs, "spacing": s["plan"]["spacing"], "shape": shape}
        with open(nn / f"{case}.pkl", "wb") as fh:
            pickle.dump(props, fh)
    return {"kits_dir": str(kits), "nnunet_dir": str(nn)}


# ----------------------------------------------------------------------------- GPU helpers
def peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


class UtilSampler:
    """Mean GPU utilisation (%) over a window, sampled every 0.5 s in a background thread.

    ``nvidia-smi`` is asked for the GPU this process sees first (CUDA_VISIBLE_DEVICES'
    first entry, an index or a UUID); without nvidia-smi, ``torch.cuda.utilization()`` (needs
    pynvml).  Each query has a 2 s timeout so a stuck driver cannot hang the benchmark.
    """

    def __init__(self, enabled: bool) -> None:
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self._gpu = visible or "0"
        if shutil.which("nvidia-smi") and self._nvidia_smi() is not None:
            self.source, self._query = "nvidia-smi", self._nvidia_smi
        else:
            with contextlib.suppress(Exception):
                torch.cuda.utilization()
                self.source, self._query = "torch.cuda.utilization", self._torch

    def _nvidia_smi(self) -> float | None:
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "-i",
                    self._gpu,
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=2,
            )
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _torch(self) -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._query()
            if v is not None:
                self.samples.append(v)
            self._stop.wait(0.5)

    def __enter__(self) -> UtilSampler:
        if self.source:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def result(self) -> dict[str, Any]:
        mean = float(np.mean(self.samples)) if self.samples else None
        return {
            "gpu_util_mean": mean,
            "gpu_util_samples": len(self.samples),
            "gpu_util_source": self.source,
        }


def forward_flops(make_net, in_channels: int, batch: int, patch: list[int]) -> float | None:
    """Forward FLOPs of one batch, counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            net = make_net()
            x = torch.empty(batch, in_channels, *patch)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                net(x)
        return float(counter.get_total_flops())
    except Exception as exc:  # a counting problem must not cost the timing
        log(f"FLOP count failed: {type(exc).__name__}: {exc}")
        return None


def device_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_name": None, "peak_bf16_tflops": None}
    name = torch.cuda.get_device_name(0)
    return {"device": "cuda", "gpu_name": name, "peak_bf16_tflops": peak_tflops(name)}


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(step, dev, s: dict) -> dict[str, Any]:
    """Warm-up (untimed; cuDNN autotuning, compilation, worker start), then iterations until
    ``seconds`` have passed and at least ``min_iters`` ran (at most ``max_iters``)."""
    t_warm = time.perf_counter()
    for _ in range(s["warmup_iters"]):
        step()
    _sync(dev)
    warmup_s = time.perf_counter() - t_warm
    log(f"warm-up {s['warmup_iters']} iterations in {warmup_s:.1f} s; timing")
    n, losses = 0, []
    with UtilSampler(dev.type == "cuda") as util:
        t0 = time.perf_counter()
        while n < s["max_iters"] and (
            n < s["min_iters"] or time.perf_counter() - t0 < s["seconds"]
        ):
            losses.append(step())
            n += 1
        _sync(dev)
        elapsed = time.perf_counter() - t0
    finite = all(np.isfinite(v) for v in losses)
    return {
        "iterations": n,
        "seconds": elapsed,
        "iters_per_s": n / elapsed,
        "sec_per_iter": elapsed / n,
        "warmup_s": warmup_s,
        "loss_last": losses[-1],
        "loss_finite": finite,
        **util.result(),
    }


def flop_figures(res: dict, fwd: float | None, info: dict, factor: float, n_passes: float) -> None:
    """Achieved TFLOP/s (``factor`` x forward FLOPs per pass) and MFU vs the bf16 peak."""
    res["forward_flops"] = fwd
    if fwd is None:
        return
    seconds = res.get("sec_per_iter") or res.get("sw_seconds")
    tflops = factor * fwd * n_passes / seconds / 1e12
    res["achieved_tflops"] = tflops
    peak = info.get("peak_bf16_tflops")
    res["mfu"] = tflops / peak if peak else None


def _peak_mem(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


# ----------------------------------------------------------------------------- kitsnet
def _kitsnet_net(s: dict):
    from kitsnet.network import build_network

    p = s["plan"]
    return build_network(p["arch"], p["in_channels"], p["num_classes"])


class _EpochClock:
    """Times the second epoch of a ``train_fold`` run from its own log lines: the line
    ``epoch 0: ...`` ends the warm-up epoch (worker start, cuDNN autotuning, compilation), the
    line ``epoch 1: ...`` ends the timed one.  GPU utilisation is sampled in between."""

    def __init__(self, dev) -> None:
        self.util = UtilSampler(dev.type == "cuda")
        self.dev, self.t0, self.t1 = dev, None, None
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(str(msg))
        log(f"train_fold: {msg}")
        if str(msg).startswith("epoch 0:"):
            self.t0 = time.perf_counter()
            self.util.__enter__()
        elif str(msg).startswith("epoch 1:"):
            self.t1 = time.perf_counter()
            self.util.__exit__()


def run_kitsnet_train(s: dict) -> dict[str, Any]:
    """The workflow's own training function, ``kitsnet.train.train_fold``, as a training job
    calls it (input pipeline with N workers, bf16 autocast, channels-last, cuDNN autotuning,
    optional compile), for two epochs of ``iterations`` each; the second epoch is timed."""
    from kitsnet.train import train_fold

    info = device_info()
    dev = torch.device(info["device"])
    plan, n = s["plan"], int(s["iterations"])
    training = dict(
        s["training"],
        epochs=2,
        iterations_per_epoch=n,
        val_iterations=1,
        checkpoint_every=1000,
        workers=s["workers"],
        compile=s["compile"],
        channels_last=s["channels_last"],
        device=info["device"],
    )
    cases = list(s["cases"])
    splits = [{"train": cases, "val": cases[:1]}]
    clock = _EpochClock(dev)
    out = Path(s["tmp"]) / "kitsnet_model"
    t_start = time.perf_counter()
    train_fold(
        plan,
        splits,
        0,
        s["kits_dir"],
        out,
        training,
        s["augmentation"],
        seed=s["seed"],
        device=info["device"],
        log=clock,
    )
    if clock.t0 is None or clock.t1 is None:
        raise RuntimeError(f"train_fold did not log two epochs: {clock.lines}")
    elapsed = clock.t1 - clock.t0
    history = (out / "training_log.csv").read_text().splitlines()
    last = dict(zip(history[0].split(","), history[-1].split(","), strict=True))
    res = {
        "iterations": n,
        "seconds": elapsed,
        "iters_per_s": n / elapsed,
        "sec_per_iter": elapsed / n,
        "warmup_s": clock.t0 - t_start,
        "loss_last": float(last["train_loss"]),
        "loss_finite": bool(np.isfinite(float(last["train_loss"]))),
        "timed": "epoch 1 of train_fold: iterations + 1 validation batch",
        **clock.util.result(),
    }
    fwd = forward_flops(
        lambda: _kitsnet_net(s), plan["in_channels"], plan["batch_size"], list(plan["patch_size"])
    )
    flop_figures(res, fwd, info, 3.0, 1)
    res.update(info)
    res["peak_mem_gib"] = _peak_mem(dev)
    res["settings"] = {
        "autocast": "bf16" if dev.type == "cuda" else "off",
        "workers": s["workers"],
        "channels_last": s["channels_last"],
        "compile": s["compile"],
        "function": "kitsnet.train.train_fold",
    }
    return res


# ----------------------------------------------------------------------------- nnU-Net
def nnunet_missing() -> str | None:
    """None when nnU-Net v2 can be imported, else why not (the nnU-Net rows are skipped)."""
    try:
        import nnunetv2  # noqa: F401
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401
    except Exception as exc:
        return f"nnunetv2 not importable ({type(exc).__name__}: {exc})"
    return None


def _nnunet_env(s: dict) -> None:
    """nnU-Net reads its settings from the environment at import: set them first."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, str(Path(s["tmp"]) / var))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_compile"] = "true" if s["compile"] else "false"
    os.environ["nnUNet_n_proc_DA"] = str(s["workers"])


def nnunet_plans(s: dict) -> tuple[dict, dict]:
    """nnU-Net plans + dataset.json equivalent to the kitsnet plan (as its planner writes them;
    the architecture mapping is benchmarks.common.nnunet_architecture)."""
    plan = s["plan"]
    architecture = nnunet_architecture(plan["arch"])
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(plan["batch_size"]),
        "patch_size": list(plan["patch_size"]),
        "median_image_size_in_voxels": s["case_shape"],
        "spacing": plan["spacing"],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {},
        "architecture": architecture,
        "batch_dice": bool(s["training"].get("batch_dice", True)),
    }
    plans = {
        "dataset_name": "Dataset999_KiTSbench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": plan["spacing"],
        "original_median_shape_after_transp": s["case_shape"],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
        "numTraining": len(s["cases"]),
        "file_ending": ".nii.gz",
    }
    return plans, dataset_json


def _nnunet_trainer_standin(s: dict, dev):
    """The attributes nnUNetTrainer's methods read, so they can be called unbound on it."""
    from types import SimpleNamespace

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = nnunet_plans(s)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(dataset_json)
    tr = SimpleNamespace(
        plans_manager=pm,
        configuration_manager=cm,
        label_manager=lm,
        dataset_json=dataset_json,
        enable_deep_supervision=True,
        is_ddp=False,
        device=dev,
        initial_lr=1e-2,
        weight_decay=3e-5,
        num_epochs=1000,
        oversample_foreground_percent=0.33,
        print_to_log_file=lambda *a, **k: None,
    )
    tr._do_i_compile = lambda: bool(s["compile"]) and dev.type == "cuda"
    return tr


def _nnunet_net(s: dict, tr, deep_supervision: bool):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.build_network_architecture(
        tr.plans_manager,
        tr.configuration_manager,
        s["plan"]["in_channels"],
        tr.label_manager.num_segmentation_heads,
        deep_supervision,
    )


def run_nnunet_train(s: dict) -> dict[str, Any]:
    _nnunet_env(s)
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as T

    info = device_info()
    dev = torch.device(info["device"])
    torch.manual_seed(s["seed"])
    np.random.seed(s["seed"])
    torch.backends.cudnn.benchmark = True  # nnUNetv2_train sets it (run/run_training.py)
    tr = _nnunet_trainer_standin(s, dev)
    cm, lm = tr.configuration_manager, tr.label_manager
    tr._get_deep_supervision_scales = lambda: T._get_deep_supervision_scales(tr)
    # initialize(): network (+ torch.compile), optimiser, loss; __init__: the grad scaler
    tr.network = _nnunet_net(s, tr, True).to(dev)
    if tr._do_i_compile():
        tr.network = torch.compile(tr.network)
    tr.optimizer, tr.lr_scheduler = T.configure_optimizers(tr)
    tr.loss = T._build_loss(tr)
    tr.grad_scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" else None
    # get_dataloaders(), training half
    rotation, dummy_2d, initial_patch, mirror_axes = (
        T.configure_rotation_dummyDA_mirroring_and_inital_patch_size(tr)
    )
    transforms = T.get_training_transforms(
        cm.patch_size,
        rotation,
        tr._get_deep_supervision_scales(),
        mirror_axes,
        dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm,
        is_cascaded=False,
        foreground_labels=lm.foreground_labels,
        regions=None,
        ignore_label=lm.ignore_label,
    )
    dataset = nnUNetDatasetNumpy(s["nnunet_dir"], list(s["cases"]))
    dl = nnUNetDataLoader(
        dataset,
        cm.batch_size,
        initial_patch,
        cm.patch_size,
        lm,
        oversample_foreground_percent=tr.oversample_foreground_percent,
        sampling_probabilities=None,
        pad_sides=None,
        transforms=transforms,
        probabilistic_oversampling=False,
    )
    n = s["workers"]
    if n == 0:
        gen = SingleThreadedAugmenter(dl, None)
    else:
        gen = NonDetMultiThreadedAugmenter(
            data_loader=dl,
            transform=None,
            num_processes=n,
            num_cached=max(6, n // 2),
            seeds=None,
            pin_memory=dev.type == "cuda",
            wait_time=0.002,
        )
    tr.network.train()
    try:
        res = measure(lambda: float(T.train_step(tr, next(gen))["loss"]), dev, s)
    finally:
        with contextlib.suppress(Exception):
            gen._finish()
    plan = s["plan"]
    fwd = forward_flops(
        lambda: _nnunet_net(s, tr, True),
        plan["in_channels"],
        plan["batch_size"],
        list(plan["patch_size"]),
    )
    flop_figures(res, fwd, info, 3.0, 1)
    res.update(info)
    res["peak_mem_gib"] = _peak_mem(dev)
    res["settings"] = {
        "autocast": "fp16+GradScaler" if dev.type == "cuda" else "off",
        "workers": n,
        "compile": tr._do_i_compile(),
        "augmentation_on": "cpu workers",
        "sampled_patch": [int(v) for v in initial_patch],
    }
    return res


# ----------------------------------------------------------------------------- sliding window
def _sw_setup(s: dict):
    """The volume (seeded) and the kitsnet weights both sliding-window parts use."""
    rng = np.random.default_rng(s["seed"] + 7)
    image = rng.standard_normal((1, *s["sw_shape"]), dtype=np.float32)
    torch.manual_seed(s["seed"])
    net = _kitsnet_net(s)
    net.deep_supervision = False
    return image, net.eval()


def _sw_passes(s: dict) -> tuple[int, int]:
    from kitsnet.infer import compute_steps

    patch = list(s["plan"]["patch_size"])
    size = [max(a, p) for a, p in zip(s["sw_shape"], patch, strict=True)]
    steps = compute_steps(size, patch, float(s["inference"]["step_size"]))
    tiles = int(np.prod([len(v) for v in steps]))
    mirrors = 2 ** len(patch) if s["inference"]["mirror"] else 1
    return tiles, mirrors


def _sw_result(s: dict, seconds: float, util: UtilSampler, info: dict, dev) -> dict:
    tiles, mirrors = _sw_passes(s)
    res = {
        "sw_seconds": seconds,
        "sw_shape": s["sw_shape"],
        "tiles": tiles,
        "mirrors": mirrors,
        **util.result(),
    }
    fwd = forward_flops(
        lambda: _kitsnet_net(s), s["plan"]["in_channels"], 1, list(s["plan"]["patch_size"])
    )
    flop_figures(res, fwd, info, 1.0, tiles * mirrors)
    res.update(info)
    res["peak_mem_gib"] = _peak_mem(dev)
    return res


def run_kitsnet_sw(s: dict) -> dict[str, Any]:
    from kitsnet.infer import predict_volume

    info = device_info()
    dev = torch.device(info["device"])
    torch.backends.cudnn.benchmark = True
    image, net = _sw_setup(s)
    net = net.to(dev)
    plan = {**s["plan"]}
    with torch.no_grad():  # warm-up: cuDNN autotuning for the tile shape
        net(torch.zeros(1, 1, *plan["patch_size"], device=dev))
    _sync(dev)
    with UtilSampler(dev.type == "cuda") as util:
        t0 = time.perf_counter()
        logits = predict_volume([net], image, plan, s["inference"], dev)
        _sync(dev)
        seconds = time.perf_counter() - t0
    res = _sw_result(s, seconds, util, info, dev)
    res["finite"] = bool(np.isfinite(logits[:, ::7, ::7, ::7]).all())
    res["settings"] = {
        "autocast": "as kitsnet.infer (none)",
        "output": "numpy on host",
        "tile_batch": s["inference"].get("tile_batch", 1),
    }
    return res


def run_nnunet_sw(s: dict) -> dict[str, Any]:
    _nnunet_env(s)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    info = device_info()
    dev = torch.device(info["device"])
    image, kits_net = _sw_setup(s)
    tr = _nnunet_trainer_standin(s, dev)
    net = _nnunet_net(s, tr, False)
    # same weights: nnU-Net's extra keys are aliases of the same parameters
    missing, unexpected = net.load_state_dict(kits_net.state_dict(), strict=False)
    bad = [k for k in missing if "all_modules" not in k and not k.startswith("decoder.encoder.")]
    if bad or unexpected:
        raise RuntimeError(f"weights do not map onto nnU-Net: missing {bad}, extra {unexpected}")
    predictor = nnUNetPredictor(
        tile_step_size=float(s["inference"]["step_size"]),
        use_gaussian=True,
        use_mirroring=bool(s["inference"]["mirror"]),
        perform_everything_on_device=True,
        device=dev,
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        net,
        tr.plans_manager,
        tr.configuration_manager,
        None,
        tr.dataset_json,
        "nnUNetTrainer",
        tuple(range(len(s["plan"]["patch_size"]))),
    )
    x = torch.from_numpy(image)
    with torch.no_grad():  # warm-up, under the autocast nnU-Net's predictor uses
        ctx = torch.autocast("cuda") if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            predictor.network.to(dev)(torch.zeros(1, 1, *s["plan"]["patch_size"], device=dev))
    _sync(dev)
    with UtilSampler(dev.type == "cuda") as util:
        t0 = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(x)
        _sync(dev)
        seconds = time.perf_counter() - t0
    res = _sw_result(s, seconds, util, info, dev)
    res["finite"] = bool(torch.isfinite(logits[:, ::7, ::7, ::7].float()).all())
    res["settings"] = {
        "autocast": "fp16" if dev.type == "cuda" else "off",
        "output": f"torch on {logits.device}",
    }
    return res


RUNNERS = {
    "kitsnet_train": run_kitsnet_train,
    "nnunet_train": run_nnunet_train,
    "kitsnet_sw": run_kitsnet_sw,
    "nnunet_sw": run_nnunet_sw,
}


def child_main(part: str, setup_file: Path, result_file: Path) -> None:
    """Run one part; write its result (or the error) to ``result_file``; hard-exit so a stuck
    worker thread or process cannot keep the child alive after the result is written."""
    s = json.loads(setup_file.read_text())
    if "KITSNET_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["KITSNET_THREADS"]))
    try:
        res = {"status": "ok", **RUNNERS[part](s)}
    except Exception as exc:
        traceback.print_exc()
        res = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, default=str))
    os.replace(tmp, result_file)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- parent
class Terminated(Exception):
    """SIGTERM reached the parent (gpu.sh's timeout): stop, keep what was measured."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def spawn(part: str, setup_file: Path, tmp: Path, timeout: float) -> dict[str, Any]:
    """One part in a child process (own session, so its workers die with it)."""
    result_file = tmp / f"result_{part}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_gpu",
        "--child",
        part,
        "--setup",
        str(setup_file),
        "--result",
        str(result_file),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return {
            "status": "timeout",
            "reason": f"killed after {timeout:.0f} s",
            "wall_s": time.perf_counter() - t0,
        }
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)  # stragglers of a child that exited (workers in its session)
    wall = time.perf_counter() - t0
    if result_file.exists():
        res = json.loads(result_file.read_text())
    else:
        res = {"status": "failed", "reason": f"child exited with {rc} and no result"}
    res["wall_s"] = wall
    return res


def _fmt(v, width: int, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """Right-aligned number (``-`` when missing) so the table's columns line up."""
    return ("-" if v is None else format(v * scale, spec) + unit).rjust(width)


def table(results: dict[str, dict]) -> str:
    """One row per part; the numbers a reader compares first (it/s, time) come first."""
    head = (
        f"{'part':24s} {'status':8s} {'it/s':>7s} {'time':>11s} {'GPU util':>8s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s} {'GPU GiB':>7s}  note"
    )
    lines = [head, "-" * len(head)]
    for part in PARTS:
        r = results.get(part, {"status": "not run"})
        if r.get("sec_per_iter") is not None:
            when = f"{r['sec_per_iter']:.3f} s/it"
        elif r.get("sw_seconds") is not None:
            when = f"{r['sw_seconds']:.1f} s"
        else:
            when = "-"
        note = r.get("reason", "")
        if r.get("status") == "ok":
            st = r.get("settings", {})
            keys = ("autocast", "workers", "channels_last", "compile")
            note = ", ".join(f"{k}={st[k]}" for k in keys if k in st)
            if "tiles" in r:
                shape = "x".join(map(str, r["sw_shape"]))
                note = f"{shape}, {r['tiles']} tiles x {r['mirrors']} mirrors, {note}"
        lines.append(
            f"{LABEL[part]:24s} {r.get('status', '?'):8s} "
            f"{_fmt(r.get('iters_per_s'), 7, '.2f')} {when:>11s} "
            f"{_fmt(r.get('gpu_util_mean'), 8, '.0f', unit=' %')} "
            f"{_fmt(r.get('achieved_tflops'), 8, '.2f')} "
            f"{_fmt(r.get('mfu'), 6, '.1f', 100, ' %')} "
            f"{_fmt(r.get('peak_mem_gib'), 7, '.1f')}  {note}"
        )
    k, p = results.get("kitsnet_train", {}), results.get("nnunet_train", {})
    if k.get("iters_per_s") and p.get("iters_per_s"):
        ratio = k["iters_per_s"] / p["iters_per_s"]
        lines.append(f"training it/s kitsnet / nnU-Net: {ratio:.2f}x")
    k, p = results.get("kitsnet_sw", {}), results.get("nnunet_sw", {})
    if k.get("sw_seconds") and p.get("sw_seconds"):
        ratio = p["sw_seconds"] / k["sw_seconds"]
        lines.append(f"sliding window time nnU-Net / kitsnet: {ratio:.2f}x")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import platform

    info = {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(device_info())
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["nnunetv2"] = version("nnunetv2")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on the CPU (default when CUDA is not available)",
    )
    ap.add_argument("--workers", type=int, help="CPU data workers, both sides (min(8, cores))")
    ap.add_argument("--seconds", type=float, help="timed window of nnU-Net's training (50)")
    ap.add_argument(
        "--iterations", type=int, help="kitsnet: iterations per epoch of train_fold, 2 epochs (100)"
    )
    ap.add_argument("--budget", type=float, help="global time budget in s (430; smoke 90)")
    ap.add_argument(
        "--sw-shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="sliding-window volume (512 512 512)",
    )
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    ap.add_argument(
        "--no-channels-last",
        action="store_true",
        help="kitsnet training in contiguous memory format",
    )
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tmp-dir", type=Path, help="where the synthetic cases go (system temp)")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child, args.setup, args.result)
        return 0  # not reached

    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    smoke = args.smoke or not torch.cuda.is_available()
    if not args.smoke and smoke:
        log("CUDA is not available: smoke mode (tiny sizes on the CPU)")
    budget = args.budget or (90.0 if smoke else 430.0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_json = args.out_dir / f"gpu-{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="kitsnet-gpu-bench-", dir=args.tmp_dir))
    s = settings(smoke, args)
    report: dict[str, Any] = {
        "mode": "smoke" if smoke else "gpu",
        "machine": machine(),
        "settings": {k: v for k, v in s.items() if k != "plan"},
        "plan_arch": s["plan"]["arch"],
        "results": {},
    }
    results: dict[str, dict] = report["results"]

    def save() -> None:
        report["total_s"] = time.perf_counter() - t_start
        tmp_json = out_json.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp_json, out_json)

    rc = 0
    try:
        log(
            f"mode {report['mode']}, device {report['machine'].get('gpu_name') or 'cpu'}, "
            f"{s['workers']} workers, budget {budget:.0f} s, results -> {out_json}"
        )
        t0 = time.perf_counter()
        s.update(make_cases(s, tmp), tmp=str(tmp))
        took = time.perf_counter() - t0
        log(f"{len(s['cases'])} synthetic cases {s['case_shape']} in {took:.1f} s")
        setup_file = tmp / "setup.json"
        setup_file.write_text(json.dumps(s))
        why_no_nnunet = nnunet_missing()
        save()
        for part in PARTS:
            if part not in args.parts:
                results[part] = {"status": "skipped", "reason": "not in --parts"}
                continue
            if part.startswith("nnunet") and why_no_nnunet:
                results[part] = {"status": "skipped", "reason": why_no_nnunet}
                log(f"{part}: skipped: {why_no_nnunet}")
                continue
            left = budget - (time.perf_counter() - t_start)
            if left < MIN_PART_S:
                results[part] = {"status": "skipped", "reason": f"time budget ({left:.0f} s left)"}
                continue
            timeout = min(part_timeout(part, s), left)
            log(f"{part}: start (timeout {timeout:.0f} s)")
            results[part] = {"status": "terminated", "reason": "the run was stopped during it"}
            results[part] = spawn(part, setup_file, tmp, timeout)
            r = results[part]
            log(f"{part}: {r['status']} in {r['wall_s']:.1f} s {r.get('reason', '')}")
            save()
    except Terminated as exc:
        log(f"terminated ({exc}); writing what was measured")
        rc = 124
    except Exception as exc:
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for part in PARTS:
            results.setdefault(part, {"status": "not run"})
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"GPU benchmark ({report['mode']} mode, {report['machine'].get('gpu_name') or 'cpu'}, "
        f"peak bf16 {report['machine'].get('peak_bf16_tflops') or 'unknown peak'} TFLOP/s, "
        f"{s['workers']} CPU workers, patch {s['plan']['patch_size']}, "
        f"batch {s['plan']['batch_size']})"
    )
    print(table(results))
    print(f"total {time.perf_counter() - t_start:.0f} s; JSON: {out_json}")
    broken = [p for p in PARTS if results[p]["status"] in ("failed", "timeout")]
    if broken and rc == 0:
        print(f"FAILED parts: {', '.join(broken)} (see their reason above and in the JSON)")
        rc = 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
