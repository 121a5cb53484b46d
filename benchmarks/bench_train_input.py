"""Benchmark ``train_input``: the training input pipeline with its worker processes, kitsnet
vs nnU-Net v2, on the paper's 3d_fullres arrays of real KiTS21 geometry.

``augment`` compares the per-core cost of making a batch in one process; this times what a
training run actually waits on: batches of the paper's 3d_fullres plan (128^3 patches cropped
from a 205^3 region, batch 2, the full augmentation set, the five deep-supervision targets of
the 6-stage network) made by two worker processes and handed to the main process, whose torch
runs one thread.  Both sides read the same cases: real KiTS21 label maps
(``$KITSNET_KITS21_LABELS``) with CT-like intensities painted from the labels (as
``benchmarks/paper_step.py`` does), preprocessed by ``kitsnet.preprocess.preprocess_case`` to
the paper's 0.78 mm grid, memory-mapped by both loaders.

kitsnet: exactly the pipeline ``kitsnet.train.train_fold`` runs on the CPU --
``InputPipeline(plan, training, augmentation, split, data_dir, seed=0, fold=0,
augment_in_workers=True)`` and ``batches(pipeline, epoch_keys(0, 0, n, 0), workers=2)``: a
``torch.utils.data.DataLoader`` with two fork workers returning the batches in order, each one
sampled (:class:`kitsnet.loader.PatchSampler`), augmented (:func:`kitsnet.augment.augment_batch`)
and given its uint8 deep-supervision targets in a worker, handed over as tensors in shared
memory.  nnU-Net: its own ``nnUNetDataLoader`` over an ``nnUNetDatasetNumpy`` folder of the same
arrays (``<case>.npy`` a symlink to kitsnet's image, ``<case>_seg.npy`` int8, ``<case>.pkl`` with
the class locations as (N, 4) arrays) with the transforms of
``nnUNetTrainer.get_training_transforms`` for the 3D isotropic patch and the 6-stage network's
deep-supervision scales (``benchmarks.common.nnunet_training_loader``, shared with ``augment``),
inside batchgenerators' ``NonDetMultiThreadedAugmenter(data_loader, transform=None,
num_processes=2, num_cached=6, seeds=None, pin_memory=False, wait_time=0.002)``, as
``nnUNetTrainer.get_dataloaders`` builds it where two processes are allowed (no GPU: no pinned
memory); it is stopped with ``_finish()`` after the timing.  One deviation: nnU-Net's arrays are
memory-mapped copy-on-write instead of read-only (``benchmarks.common.nnunet_numpy_dataset``):
with read-only maps nnU-Net 2.8.1 crashes (segmentation fault) on the first crop that lies wholly
inside one of these real-size cases, because its transforms then write into a view of the map.

Untimed (``prepare_kitsnet`` / ``prepare_peer``, see ``benchmarks/harness.py``): opening the
dataset, building the transforms, forking the workers and pulling two warm-up batches, so worker
start-up does not count and both sides' workers are busy on their next batches when the clock
starts.  Timed: taking the next ``batches`` batches in the main process (touching each image
once: its sum), both main processes with one torch thread.  ``ratio`` = nnU-Net seconds /
kitsnet seconds for the same number of batches = kitsnet's batches per second / nnU-Net's.

Memory and CPU (``TREE_MEMORY``): ``peak_mb`` is the peak of the summed PSS of the child and its
worker processes during the timed call, sampled by a low-priority thread (fewer samples when the
workers use every core); it includes the pages of the memory-mapped cases the workers have read
(kitsnet keeps its maps open for the run, nnU-Net reopens them per case), so ``*_peak_anon_mb``
(the same without file-backed pages) is the fairer comparison of what the pipelines allocate.
``*_cpu_s`` / ``cpu_ratio``: CPU seconds of the whole process tree during the timed call, a
figure less sensitive than wall time to other load on a shared machine.

``check`` (one extra child) asks whether the training loop overlaps loading with compute. It
times the pipeline alone again (``pipeline_batches_per_s``), then ``train_fold`` with the same
plan, data and two workers but a nearly free network (one feature per stage, 1^3 kernels, deep
supervision kept so every target is used), two epochs of ``batches`` iterations; epoch 1 (its
iterations and one validation batch, between the ``epoch 0:`` and ``epoch 1:`` log lines) gives
``train_fold_iterations_per_s``, and ``loop_at_80pct_of_input_rate`` = ``loop_over_pipeline`` >=
0.8. On a CPU that criterion measures the step more than the overlap: the loss at 128^3 x 4
classes with deep supervision costs about a second per step on one core even for a 1-feature
network, far longer than two workers need for a batch. So it also reports ``step_s`` (one step
of train_fold's own step code on a ready batch, alone), ``loop_over_step_rate`` (the loop's rate
over 1 / step_s) and ``input_wait_fraction_epoch1`` (the share of epoch 1 the loop spent in
``next()`` waiting for a batch, from a wrapper around the stream ``train_fold`` gets): near 0
means overlapped; ``overlap_ok`` when it is under 5%.

The arrays (several hundred MB per case) are written once to a cache folder in the temporary
directory (keyed by ``VERSION`` and the size) and reused by every child process.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

NAME = "train_input"
GOAL = 2.0
THREADS = 1  # torch threads of the main process on both sides; the workers use one each
TREE_MEMORY = True
WORKERS = 2
VERSION = "v1"

REPO = Path(__file__).resolve().parents[1]
# full: four real cases around the paper's median fullres shape (1 to 5 mm slices); quick: two
# small ones cropped to their kidneys (plus a margin), so the cache is made in seconds
FULL = {
    "cases": ["case_00003", "case_00057", "case_00136", "case_00191"],
    "crop": None,
    "batches": 40,
    "warmup": 2,
}
QUICK = {"cases": ["case_00268", "case_00287"], "crop": 8, "batches": 6, "warmup": 2}

WHAT = (
    f"{FULL['batches']} batches of 2 x 128^3 (region 205^3, full augmentation, 5 DS targets) "
    f"from {len(FULL['cases'])} real-geometry KiTS21 cases at 0.78 mm, {WORKERS} worker "
    "processes each side (nnU-Net: NonDetMultiThreadedAugmenter)"
)


def _sizes(quick: bool) -> dict[str, Any]:
    return QUICK if quick else FULL


def skip_reason() -> str | None:
    from benchmarks.paper_step import missing_label_maps

    return missing_label_maps(FULL["cases"] + QUICK["cases"])


def peer_available() -> str | None:
    try:
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (  # noqa: F401
            NonDetMultiThreadedAugmenter,
        )
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 / batchgenerators not importable: {exc}"
    return None


# ----------------------------------------------------------------------------- the paper's data


def _config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())


def _paper_plan(cfg: dict[str, Any]) -> dict[str, Any]:
    """``make_plan('3d_fullres')`` of config/kits21.yaml on the fingerprint of all real label
    maps, with paper_step's CT intensity statistics."""
    from benchmarks.paper_step import real_geometry_fingerprint
    from kitsnet.plan import make_plan

    return make_plan("3d_fullres", real_geometry_fingerprint(), copy.deepcopy(cfg))


def _cropped_case(case: str, out: Path, margin: int) -> tuple[Path, Path]:
    """``paper_step.painted_case`` of the label map cropped to its foreground's bounding box
    plus ``margin`` voxels."""
    import nibabel as nib

    from benchmarks.paper_step import label_map, painted_case

    lab = nib.load(label_map(case))
    full = np.asarray(lab.dataobj)
    box = tuple(
        slice(max(0, int(a.min()) - margin), int(a.max()) + 1 + margin) for a in np.nonzero(full)
    )
    return painted_case(lab.slicer[box], case, out)  # slicer keeps the affine right


def _write_case(case: str, root: Path, crop: int | None) -> None:
    """One case preprocessed by kitsnet into ``root/kitsnet`` and viewed in nnU-Net's layout in
    ``root/nnunet``: the image a (relative) symlink, the labels (1, *S) int8, the class
    locations as (N, 4) arrays in ``<case>.pkl``."""
    from benchmarks.paper_step import _real_case
    from kitsnet.io import load_json
    from kitsnet.preprocess import preprocess_case

    src = root / "src"
    if crop is None:
        image, label = _real_case(case, src)
    else:
        image, label = _cropped_case(case, src, crop)
    kits, nnu = root / "kitsnet", root / "nnunet"
    files = [kits / f"{case}{x}" for x in ("_image.npy", "_seg.npy", ".json")]
    preprocess_case(image, label, case, _paper_plan(_config()), *files)
    shutil.rmtree(src / case)
    os.symlink(Path("..") / "kitsnet" / f"{case}_image.npy", nnu / f"{case}.npy")
    seg = np.load(files[1], mmap_mode="r")
    np.save(nnu / f"{case}_seg.npy", seg[None].astype(np.int8))
    props = load_json(files[2])
    locs = {
        int(k): np.array([[0, *c] for c in v], dtype=np.int64).reshape(-1, 4)
        for k, v in props["class_locations"].items()
    }
    with open(nnu / f"{case}.pkl", "wb") as fh:
        pickle.dump({"class_locations": locs, "spacing": props["spacing"], "shape": seg.shape}, fh)


def _data_root(sizes: dict[str, Any]) -> Path:
    """The cache folder of these cases, written on first use (two cases at a time, then
    atomically renamed into place)."""
    key = f"{VERSION}-{'crop' + str(sizes['crop']) if sizes['crop'] else 'full'}"
    key += "-" + "-".join(c.split("_")[1] for c in sizes["cases"])
    root = Path(tempfile.gettempdir()) / f"kitsnet-bench-train_input-{key}"
    if (root / "done").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for sub in ("kitsnet", "nnunet", "src"):
            (tmp / sub).mkdir()
        cases, k = sizes["cases"], len(sizes["cases"])
        with ProcessPoolExecutor(max_workers=min(2, k)) as pool:
            list(pool.map(_write_case, cases, [tmp] * k, [sizes["crop"]] * k))
        (tmp / "src").rmdir()
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- protocol


def setup(quick: bool) -> dict[str, Any]:
    """The cached cases, the paper's plan and config sections (nothing started yet)."""
    sizes = _sizes(quick)
    root = _data_root(sizes)
    cfg = _config()
    return {
        **sizes,
        "root": root,
        "plan": _paper_plan(cfg),
        "training": cfg["training"],
        "augmentation": cfg["augmentation"],
    }


def _split(inputs: dict[str, Any]) -> dict[str, list[str]]:
    return {"train": list(inputs["cases"]), "val": list(inputs["cases"][:1])}


def _kitsnet_iterator(inputs: dict[str, Any]):
    from kitsnet.pipeline import InputPipeline, batches, epoch_keys

    pipe = InputPipeline(
        inputs["plan"],
        inputs["training"],
        inputs["augmentation"],
        _split(inputs),
        inputs["root"] / "kitsnet",
        seed=0,
        fold=0,
        augment_in_workers=True,
    )
    n = inputs["warmup"] + inputs["batches"]
    return batches(pipe, epoch_keys(0, 0, n, 0), workers=WORKERS)


def _touch_kitsnet(batch: dict) -> float:
    assert batch["image"].shape == (2, 1, 128, 128, 128) and len(batch["targets"]) == 5
    return float(batch["image"].sum())


def _touch_peer(batch: dict) -> float:
    assert batch["data"].shape == (2, 1, 128, 128, 128) and len(batch["target"]) == 5
    return float(batch["data"].sum())


def prepare_kitsnet(inputs: dict[str, Any]) -> dict[str, Any]:
    """Untimed: the pipeline opened, the two workers forked, the warm-up batches taken."""
    it = _kitsnet_iterator(inputs)
    for _ in range(inputs["warmup"]):
        _touch_kitsnet(next(it))
    return {"iter": it, "n": inputs["batches"], "touch": _touch_kitsnet}


def prepare_peer(inputs: dict[str, Any]) -> dict[str, Any]:
    """Untimed: nnU-Net's loader and transforms built, its augmenter's two processes started
    (as ``nnUNetTrainer.get_dataloaders`` with ``get_allowed_n_proc_DA() == 2``), the warm-up
    batches taken."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )

    from benchmarks.common import nnunet_training_loader

    plan = inputs["plan"]
    loader = nnunet_training_loader(
        inputs["root"] / "nnunet",
        inputs["cases"],
        int(plan["patch_size"][0]),
        int(plan["batch_size"]),
        len(plan["arch"]["features_per_stage"]),  # 6 stages: 5 deep-supervision outputs
        float(inputs["training"]["oversample_foreground"]),  # 0.33, nnU-Net's default
        copy_on_write=True,  # see benchmarks.common.nnunet_numpy_dataset: else it crashes
    )
    augmenter = NonDetMultiThreadedAugmenter(
        data_loader=loader,
        transform=None,
        num_processes=WORKERS,
        num_cached=max(6, WORKERS // 2),
        seeds=None,
        pin_memory=False,
        wait_time=0.002,
    )
    for _ in range(inputs["warmup"]):
        _touch_peer(next(augmenter))
    return {"iter": augmenter, "n": inputs["batches"], "touch": _touch_peer, "mta": augmenter}


def _run(state: dict[str, Any]) -> list[float]:
    return [state["touch"](next(state["iter"])) for _ in range(state["n"])]


def run_kitsnet(state: dict[str, Any]) -> list[float]:
    return _run(state)


def run_peer(state: dict[str, Any]) -> list[float]:
    return _run(state)


def _close(stream) -> None:
    """Stop a kitsnet batch stream's workers: ``close()`` where the stream has it, else (an
    older ``batches`` returning the DataLoader iterator) its worker shutdown."""
    stop = getattr(stream, "close", None) or getattr(stream, "_shutdown_workers", None)
    if stop is not None:
        stop()


def finish(state: dict[str, Any]) -> None:
    """Stop the workers (untimed): nnU-Net's augmenter by ``_finish``, kitsnet's stream by
    closing it."""
    if "mta" in state:
        state["mta"]._finish()
    else:
        _close(state["iter"])
    state.clear()


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    n = _sizes(quick)["batches"]
    return {
        "batches": n,
        "batch_size": 2,
        "workers_per_side": WORKERS,
        "kitsnet_batches_per_s": n / seconds,
        "ratio_means": "nnU-Net s / kitsnet s = kitsnet batches/s / nnU-Net batches/s",
    }


# ----------------------------------------------------------------------------- overlap check


def _trivial_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The plan's network shape (stages, strides, deep supervision) at almost no cost: one
    feature per stage, 1^3 kernels, one convolution per stage."""
    n = len(arch["features_per_stage"])
    return {
        **arch,
        "features_per_stage": [1] * n,
        "kernel_sizes": [[1] * int(arch["dim"])] * n,
        "n_conv_per_stage": 1,
        "n_conv_per_stage_decoder": 1,
        "deep_supervision": True,
    }


class _Waiting:
    """A batch stream of ``kitsnet.pipeline.batches`` that records, for every batch the loop
    takes, when it asked and how long it waited for it; otherwise the stream itself."""

    def __init__(self, stream, waits: list[tuple[float, float]]):
        self._stream, self._waits = stream, waits

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        batch = next(self._stream)
        self._waits.append((t0, time.perf_counter() - t0))
        return batch

    def close(self) -> None:
        _close(self._stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def check(quick: bool) -> dict[str, Any]:
    """The pipeline's batches/s alone, then ``train_fold``'s iterations/s with a trivial
    network on the same pipeline; ``overlap_ok`` when the loop waits for batches < 5% of the time.

    Also reported, because a CPU may not be able to step a 128^3 batch much faster than two
    workers make one: ``step_s``, one training step of train_fold's own step code alone (the
    loss at 128^3 x 4 classes is not free even for a 1-feature network), and the time the loop
    spent waiting for its batches in epoch 1 (``kitsnet.train.batches`` wrapped to time each
    ``next``): near 0 when loading overlaps with compute."""
    import torch

    import kitsnet.train as train_module

    inputs = setup(quick)
    n = inputs["batches"]
    state = prepare_kitsnet(inputs)
    t0 = time.perf_counter()
    _run(state)
    alone = n / (time.perf_counter() - t0)
    finish(state)

    plan = dict(inputs["plan"], arch=_trivial_arch(inputs["plan"]["arch"]))
    training = dict(
        inputs["training"],
        workers=WORKERS,
        epochs=2,
        iterations_per_epoch=n,
        val_iterations=1,
        checkpoint_every=1000,
        device="cpu",
    )
    marks: dict[int, float] = {}

    def log(line: str) -> None:
        for epoch in (0, 1):
            if line.startswith(f"epoch {epoch}:"):
                marks[epoch] = time.perf_counter()

    waits: list[tuple[float, float]] = []
    real_batches = getattr(train_module, "batches", None)
    if real_batches is not None:
        train_module.batches = lambda *a, **kw: _Waiting(real_batches(*a, **kw), waits)
    try:
        with tempfile.TemporaryDirectory(prefix="kitsnet-bench-train_input-check.") as out:
            t_start = time.perf_counter()
            train_module.train_fold(
                plan,
                [_split(inputs)],
                0,
                inputs["root"] / "kitsnet",
                out,
                training,
                inputs["augmentation"],
                seed=0,
                device="cpu",
                log=log,
            )
            wall = time.perf_counter() - t_start
    finally:
        if real_batches is not None:
            train_module.batches = real_batches
    epoch1 = marks[1] - marks[0]
    loop = n / epoch1
    ratio = loop / alone
    step = _step_seconds(plan, training, inputs)
    waited = [w for t, w in waits if marks[0] <= t < marks[1]]
    return {
        "batches": n,
        "workers": WORKERS,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_main": torch.get_num_threads(),
        "pipeline_batches_per_s": alone,
        "train_fold_iterations_per_s": loop,
        "train_fold_epoch1_s": epoch1,
        "train_fold_wall_s": wall,
        "loop_over_pipeline": ratio,
        # the literal criterion (>= 80% of the input rate); unreachable on a CPU where
        # one step costs more than a batch (see step_s)
        "loop_at_80pct_of_input_rate": ratio >= 0.8,
        # the overlap itself: the loop waited for its batches < 5% of the epoch
        "overlap_ok": bool(waited) and sum(waited) / epoch1 < 0.05,
        "means": (
            "train_fold epoch 1 (n iterations + 1 validation batch) with a 1-feature network, "
            "iterations/s, over the pipeline's batches/s alone (same workers, same data)"
        ),
        "step_s": step,
        "loop_over_step_rate": loop * step if step else None,
        "input_wait_s_epoch1": sum(waited) if waited else None,
        "input_wait_fraction_epoch1": sum(waited) / epoch1 if waited else None,
        "input_waits_counted": len(waited),
    }


def _step_seconds(plan: dict, training: dict, inputs: dict) -> float | None:
    """One training step of ``train_fold`` (its own step code) with this plan on a ready
    batch, in this process: the median of three after one warm-up step."""
    import torch

    from kitsnet.pipeline import BatchKey, InputPipeline

    try:
        from kitsnet.train import _State, _Steps

        dev = torch.device("cpu")
        pipe = InputPipeline(
            plan, training, inputs["augmentation"], _split(inputs), inputs["root"] / "kitsnet"
        )
        state = _State(plan, training, 0, 0, dev)
        steps = _Steps(plan, training, pipe, state, dev, log=lambda _: None)
        batch = pipe.make(BatchKey("train", 0, 0))
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            steps.step(state, batch)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[1]
    except (ImportError, TypeError, AttributeError):  # train.py's internals changed
        return None
