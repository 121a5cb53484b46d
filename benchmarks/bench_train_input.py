"""Benchmark ``train_input``: the training input pipeline with two worker processes per side.

What a training run waits on (``augment`` compares one process): batches of the paper's
3d_fullres plan (128^3 from 205^3, batch 2, full augmentation, five deep-supervision targets)
for a main process with one torch thread, from real-geometry cases (``benchmarks.inputs``)
preprocessed to 0.78 mm and memory-mapped.  kitsnet: ``InputPipeline`` + ``batches`` as
``train_fold`` runs them on the CPU.  nnU-Net: ``tests.reference.nnunet_plans.training_loader``
(copy-on-write maps) in ``NonDetMultiThreadedAugmenter``, as its trainer builds it without a
GPU.  Untimed (``prepare_*``): opening, forking, two warm-up batches.  ``ratio`` = nnU-Net s /
kitsnet s; ``TREE_MEMORY``: the process tree's PSS (``*_peak_anon_mb`` without mapped pages).
``check``: ``train_fold`` with a nearly free network on the same pipeline; on a CPU a step
outlasts two workers' batch, so ``step_s`` and ``input_wait_fraction_epoch1`` (``overlap_ok``
under 5%) show whether loading overlaps compute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks import common
from benchmarks.inputs import missing_label_maps, preprocessed_files, real_case

NAME = "train_input"
GOAL = 2.0
THREADS = 1  # torch threads of the main process on both sides; the workers use one each
TREE_MEMORY = True
WORKERS = 2
VERSION = "v1"
peer_available = common.trainer_available

# full: four real cases around the paper's median fullres shape (1 to 5 mm slices); quick: two
# small ones cropped to their kidneys (plus a margin), so the cache is made in seconds
PAPER_CASES = ["case_00003", "case_00057", "case_00136", "case_00191"]
FULL = {"cases": PAPER_CASES, "crop": None, "batches": 40, "warmup": 2}
QUICK = {"cases": ["case_00268", "case_00287"], "crop": 8, "batches": 6, "warmup": 2}

WHAT = (
    f"{FULL['batches']} batches of 2 x 128^3 (region 205^3, full augmentation, 5 DS targets) "
    f"from {len(FULL['cases'])} real-geometry KiTS21 cases at 0.78 mm, {WORKERS} worker "
    "processes each side (nnU-Net: NonDetMultiThreadedAugmenter)"
)


def skip_reason() -> str | None:
    return missing_label_maps(FULL["cases"] + QUICK["cases"])


def _write_case(case: str, root: Path, crop: int | None) -> None:
    """One case preprocessed into ``root/kitsnet``, viewed by nnU-Net in ``root/nnunet``."""
    from kitsnet.preprocess.case import preprocess_case
    from tests.reference.nnunet_plans import nnunet_case

    image, label = real_case(case, root / "src", crop)
    files = preprocessed_files(root / "kitsnet", case)
    preprocess_case(image, label, case, common.paper_plans(("3d_fullres",))["3d_fullres"], *files)
    shutil.rmtree(root / "src" / case)
    nnunet_case(files, root / "nnunet", case)


def _write(root: Path, sizes: dict[str, Any]) -> None:
    for sub in ("kitsnet", "nnunet", "src"):
        (root / sub).mkdir()
    cases, k = sizes["cases"], len(sizes["cases"])
    with ProcessPoolExecutor(max_workers=min(2, k)) as pool:  # two cases at a time
        list(pool.map(_write_case, cases, [root] * k, [sizes["crop"]] * k))
    (root / "src").rmdir()


def setup(quick: bool) -> dict[str, Any]:
    """The cached cases, the paper's plan and config sections (nothing started yet)."""
    sizes = QUICK if quick else FULL
    key = f"{VERSION}-{'crop' + str(sizes['crop']) if sizes['crop'] else 'full'}"
    key += "-" + "-".join(c.split("_")[1] for c in sizes["cases"])
    root = common.cached(NAME, key, lambda tmp: _write(tmp, sizes))
    plan, cfg = common.paper_plans(("3d_fullres",))["3d_fullres"], common.paper_config()
    inputs = {**sizes, "root": root, "plan": plan}
    return {**inputs, "training": cfg["training"], "augmentation": cfg["augmentation"]}


def _split(inputs: dict[str, Any]) -> dict[str, list[str]]:
    return {"train": list(inputs["cases"]), "val": list(inputs["cases"][:1])}


def _touch(image: str, targets: str, batch: dict) -> float:
    """Take a batch as the training step does: the paper's shapes, the image read once."""
    assert batch[image].shape == (2, 1, 128, 128, 128) and len(batch[targets]) == 5
    return float(batch[image].sum())


_touch_kitsnet, _touch_peer = partial(_touch, "image", "targets"), partial(_touch, "data", "target")


def prepare_kitsnet(inputs: dict[str, Any]) -> dict[str, Any]:
    """Untimed: the pipeline opened, the two workers forked, the warm-up batches taken."""
    from kitsnet.train.pipeline import InputPipeline, batches, epoch_keys

    sections = inputs["plan"], inputs["training"], inputs["augmentation"], _split(inputs)
    data = inputs["root"] / "kitsnet"
    pipe = InputPipeline(*sections, data, seed=0, fold=0, augment_in_workers=True)
    keys = epoch_keys(0, 0, inputs["warmup"] + inputs["batches"], 0)
    stream = batches(pipe, keys, workers=WORKERS)
    for _ in range(inputs["warmup"]):
        _touch_kitsnet(next(stream))
    return {"iter": stream, "n": inputs["batches"], "touch": _touch_kitsnet, "stop": stream.close}


def prepare_peer(inputs: dict[str, Any]) -> dict[str, Any]:
    """Untimed: the loader built, the augmenter's processes started, the warm-up batches."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter as Augmenter,
    )

    from tests.reference.nnunet_plans import training_loader

    oversample = float(inputs["training"]["oversample_foreground"])  # 0.33, nnU-Net's default
    # copy-on-write: see tests.reference.nnunet_plans.numpy_dataset; else nnU-Net crashes
    cases, plan = inputs["cases"], inputs["plan"]
    loader = training_loader(inputs["root"] / "nnunet", cases, plan, oversample, True)
    # no transform (the loader has them), num_cached, no seeds, no pinned memory, wait_time
    augmenter = Augmenter(loader, None, WORKERS, max(6, WORKERS // 2), None, False, 0.002)
    for _ in range(inputs["warmup"]):
        _touch_peer(next(augmenter))
    state = {"iter": augmenter, "n": inputs["batches"], "touch": _touch_peer}
    return {**state, "stop": augmenter._finish}


def _run(state: dict[str, Any]) -> list[float]:
    return [state["touch"](next(state["iter"])) for _ in range(state["n"])]


run_kitsnet = run_peer = _run


def finish(state: dict[str, Any]) -> None:
    """Stop the workers (untimed): nnU-Net's augmenter by ``_finish``, kitsnet's by ``close``."""
    state.pop("stop")()
    state.clear()


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    n = (QUICK if quick else FULL)["batches"]
    return {
        "batches": n,
        "batch_size": 2,
        "workers_per_side": WORKERS,
        "kitsnet_batches_per_s": n / seconds,
        "ratio_means": "nnU-Net s / kitsnet s = kitsnet batches/s / nnU-Net batches/s",
    }


# ----------------------------------------------------------------------------- overlap check


def _train_two_epochs(inputs: dict, plan: dict, training: dict) -> tuple[dict, list, float]:
    """``train_fold`` for two epochs, each batch it takes timed: when its ``epoch 0:`` /
    ``epoch 1:`` lines came, each batch's (asked, waited) and the wall time."""
    from kitsnet.train.loop import train_fold
    from kitsnet.train.pipeline import BatchStream

    marks: dict[int, float] = {}
    waits: list[tuple[float, float]] = []
    real_next = BatchStream.__next__

    def timed_next(stream: BatchStream) -> dict:
        t0 = time.perf_counter()
        batch = real_next(stream)
        waits.append((t0, time.perf_counter() - t0))
        return batch

    def log(line: str) -> None:
        for epoch in (0, 1):
            if line.startswith(f"epoch {epoch}:"):
                marks[epoch] = time.perf_counter()

    with (
        mock.patch.object(BatchStream, "__next__", timed_next),
        tempfile.TemporaryDirectory(prefix="kitsnet-bench-train_input-check.") as out,
    ):
        t0, data, aug = time.perf_counter(), inputs["root"] / "kitsnet", inputs["augmentation"]
        train_fold(
            plan, [_split(inputs)], 0, data, out, training, aug, seed=0, device="cpu", log=log
        )
        return marks, waits, time.perf_counter() - t0


def check(quick: bool) -> dict[str, Any]:
    """The pipeline's batches/s alone, then ``train_fold``'s iterations/s with a trivial
    network (one feature per stage, 1^3 kernels, one convolution, deep supervision kept) on the
    same pipeline, one step's time alone and the loop's waits for batches in epoch 1."""
    import torch

    inputs = setup(quick)
    n, state = inputs["batches"], prepare_kitsnet(inputs)
    t0 = time.perf_counter()
    _run(state)
    alone = n / (time.perf_counter() - t0)
    finish(state)
    arch, stages = inputs["plan"]["arch"], len(inputs["plan"]["arch"]["features_per_stage"])
    trivial = {"features_per_stage": [1] * stages, "kernel_sizes": [[1] * 3] * stages}
    trivial.update(n_conv_per_stage=1, n_conv_per_stage_decoder=1, deep_supervision=True)
    plan = dict(inputs["plan"], arch={**arch, **trivial})
    training = dict(inputs["training"], workers=WORKERS, epochs=2, iterations_per_epoch=n)
    training.update(val_iterations=1, checkpoint_every=1000, device="cpu")
    marks, waits, wall = _train_two_epochs(inputs, plan, training)
    epoch1 = marks[1] - marks[0]
    loop, step = n / epoch1, _step_seconds(plan, training, inputs)
    waits = [w for t, w in waits if marks[0] <= t < marks[1]]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    out = dict(batches=n, workers=WORKERS, cpus=cpus, torch_threads_main=torch.get_num_threads())
    out.update(pipeline_batches_per_s=alone, train_fold_iterations_per_s=loop)
    out.update(train_fold_epoch1_s=epoch1, train_fold_wall_s=wall, loop_over_pipeline=loop / alone)
    # the literal criterion; unreachable on a CPU where a step outlasts a batch
    out["loop_at_80pct_of_input_rate"] = loop / alone >= 0.8
    # the overlap itself: the loop waited for its batches < 5% of the epoch
    out["overlap_ok"] = bool(waits) and sum(waits) / epoch1 < 0.05
    out["means"] = (
        "train_fold epoch 1 (n iterations + 1 validation batch) with a 1-feature network, "
        "iterations/s, over the pipeline's batches/s alone (same workers, same data)"
    )
    out.update(step_s=step, loop_over_step_rate=loop * step)
    out["input_wait_s_epoch1"] = sum(waits) if waits else None
    out["input_wait_fraction_epoch1"] = sum(waits) / epoch1 if waits else None
    return {**out, "input_waits_counted": len(waits)}


def _step_seconds(plan: dict, training: dict, inputs: dict) -> float:
    """One training step of ``train_fold``'s own step code on a ready batch, in this process:
    the median of three after one warm-up step."""
    import torch

    from kitsnet.train.pipeline import BatchKey, InputPipeline
    from kitsnet.train.steps import TrainingState, TrainingSteps

    dev = torch.device("cpu")
    pipe = InputPipeline(
        plan, training, inputs["augmentation"], _split(inputs), inputs["root"] / "kitsnet"
    )
    state = TrainingState(plan, training, 0, 0, dev)
    steps = TrainingSteps(plan, training, pipe, state, dev, log=lambda _: None)
    batch = pipe.make(BatchKey("train", 0, 0))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        steps.step(state, batch)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]
