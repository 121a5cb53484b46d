"""Benchmark ``augment``: the training data pipeline on one CPU core, kitsnet vs nnU-Net v2.

Patches per second per core bound the CPU cores a GPU needs.  Both sides make the same
3d_fullres patches from the same cases in one thread: foreground-oversampled sampling of the
enlarged region (205^3 for 128^3), the whole augmentation set and the deep-supervision targets.
kitsnet: ``PatchSampler``, ``augment_batch`` and ``total_loss``'s target downsampling, as
``train_fold`` runs them; nnU-Net: ``tests.reference.nnunet_plans.training_loader``'s
``generate_train_batch()``.  ``ratio`` = nnU-Net s / kitsnet s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.inputs import write_cases

NAME = "augment"
GOAL = 2.0
THREADS = 1  # per-core throughput: both sides single-threaded

FULL = {"patch": 128, "batch": 2, "patches": 64, "cases": 4, "shape": (176, 224, 224)}
QUICK = {"patch": 64, "batch": 2, "patches": 32, "cases": 2, "shape": (96, 112, 112)}
N_STAGES = 6  # network stages of the 128^3 3d_fullres plan: 5 deep-supervision outputs
OVERSAMPLE = 0.33
peer_available = common.trainer_available

WHAT = (
    f"{FULL['patches']} patches {FULL['patch']}^3 (batch {FULL['batch']}, initial patch 205^3) "
    f"from {FULL['cases']} cases {'x'.join(map(str, FULL['shape']))}: fg oversampling + "
    "rotation/scaling, noise, blur, brightness, contrast, low-res, gamma x2, mirror, DS targets"
)


def _plan(sizes: dict[str, Any]) -> dict[str, Any]:
    """The patch, batch and 6-stage topology (stride 2 while >= 8 voxels) of the plan."""
    strides, size = [[1, 1, 1]], sizes["patch"]
    for _ in range(N_STAGES - 1):
        stride = 2 if size >= 8 else 1
        size //= stride
        strides.append([stride] * 3)
    arch = {"strides": strides, "deep_supervision": True}
    return {"patch_size": [sizes["patch"]] * 3, "batch_size": sizes["batch"], "arch": arch}


def _kitsnet_pipeline(plan: dict, root: Path, cases: list[str]) -> Callable[[], float]:
    """One training iteration's data work in ``train_fold``: sample, augment, targets."""
    import torch

    from kitsnet.train.augment import augment_batch
    from kitsnet.train.loader import CaseStore, PatchSampler, augment_settings, region_size
    from kitsnet.train.loss import deep_supervision_weights, downsample_target
    from kitsnet.train.pipeline import ds_target_shapes

    augmentation, patch = common.paper_config()["augmentation"], plan["patch_size"]
    aug = augment_settings(augmentation, 3)
    region = region_size(patch, augmentation, 3)
    store = CaseStore(cases, root / "kitsnet")
    sampler = PatchSampler(store, region, patch, 3, OVERSAMPLE, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(0)
    shapes = ds_target_shapes(plan)
    # total_loss downsamples the target, as below, for every output it weighs (not the lowest)
    shapes = [s for s, w in zip(shapes, deep_supervision_weights(len(shapes)), strict=True) if w]

    def batch() -> float:
        img, seg = sampler.sample(plan["batch_size"], 0)
        img_t, seg_t = augment_batch(torch.from_numpy(img), torch.from_numpy(seg), patch, aug, gen)
        seg_t = seg_t.long()
        targets = [downsample_target(seg_t, shape) for shape in shapes]
        return float(img_t.sum()) + sum(float(t.sum()) for t in targets)

    return batch


def _peer_pipeline(plan: dict, root: Path, cases: list[str]) -> Callable[[], float]:
    """nnU-Net's training loader with its 3d_fullres transforms, in the main process."""
    import torch

    from tests.reference.nnunet_plans import training_loader

    loader = training_loader(root / "nnunet", cases, plan, OVERSAMPLE)
    np.random.seed(0)  # nnU-Net's loader and transforms draw from the global generators
    torch.manual_seed(0)

    def batch() -> float:
        out = loader.generate_train_batch()
        return float(out["data"].sum()) + sum(float(t.sum()) for t in out["target"])

    return batch


def setup(quick: bool) -> dict[str, Any]:
    """The cached cases and both pipelines opened on them."""
    sizes = QUICK if quick else FULL
    plan = _plan(sizes)
    cases, shape = [f"case_{i:05d}" for i in range(sizes["cases"])], list(sizes["shape"])
    key = f"{sizes['cases']}x{'x'.join(map(str, shape))}-v2"
    norm, spacing = common.NORMALIZATION, common.FULLRES
    root = common.cached(NAME, key, lambda tmp: write_cases(tmp, cases, shape, norm, spacing))
    inputs = {**sizes, "kitsnet": _kitsnet_pipeline(plan, root, cases)}
    if peer_available() is None:
        inputs["peer"] = _peer_pipeline(plan, root, cases)
    return inputs


def _run(inputs: dict[str, Any], side: str) -> list[float]:
    return [inputs[side]() for _ in range(inputs["patches"] // inputs["batch"])]


run_kitsnet, run_peer = partial(_run, side="kitsnet"), partial(_run, side="peer")


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    """kitsnet's throughput; nnU-Net's is this divided by ``ratio`` (same patches, same core)."""
    n = (QUICK if quick else FULL)["patches"]
    return {
        "patches": n,
        "kitsnet_patches_per_s_per_core": n / seconds,
        "ratio_means": "nnU-Net s / kitsnet s = kitsnet patches/s/core / nnU-Net patches/s/core",
    }
