"""Benchmark ``augment``: the training data pipeline on one CPU core, kitsnet vs nnU-Net v2.

Every training iteration needs a batch of augmented patches.  nnU-Net makes them on CPU
worker processes while the GPU trains, so its patches per second per core bound how many cores
a GPU needs; kitsnet runs the same pipeline on the CPU (or on the GPU).  Both sides produce
the same number of patches of the 3d_fullres configuration from the same preprocessed cases,
single-threaded, in the main process:

- patch sampling: random case, the last third of each batch forced onto a foreground voxel
  (nnU-Net's ``oversample_foreground_percent`` 0.33), the enlarged initial patch (205^3 for a
  128^3 patch: room for 30 degree rotations and scaling) cropped from the memory-mapped case;
- the whole augmentation set nnU-Net trains 3d_fullres with: rotation/scaling, Gaussian noise,
  Gaussian blur, brightness, contrast, simulated low resolution, inverted gamma, gamma,
  mirroring, and the deep-supervision targets (the segmentation at 1, 1/2, 1/4, 1/8 [, 1/16]).

kitsnet: :class:`kitsnet.loader.PatchSampler` + :func:`kitsnet.augment.augment_batch` (one
batched call), then the deep-supervision target downsampling ``kitsnet.loss.total_loss``
does for every deep-supervision output with a non-zero weight -- exactly what ``train_fold``
runs per iteration before the forward pass.  nnU-Net: its own ``nnUNetDataLoader`` over an
``nnUNetDatasetNumpy`` folder of the same arrays, with the transforms of
``nnUNetTrainer.get_training_transforms`` built with the arguments ``nnUNetTrainer`` derives
for a 3D isotropic patch (rotation +-30 degrees, mirror axes (0, 1, 2), no dummy 2D, the
deep-supervision scales of the 6-stage network); ``generate_train_batch()`` is called
directly instead of through its multiprocessing augmenter, so no worker processes run.

Timed is only the making of the batches; opening the dataset (kitsnet reads its case index,
nnU-Net builds its transforms) happens once per training run and is done in ``setup``, as are
the imports.  ``ratio`` = nnU-Net seconds / kitsnet seconds for the same number of patches,
which is the same as kitsnet's patches per second per core divided by nnU-Net's.

The synthetic cases (KiTS-like: two kidneys, a tumour, a cyst, CT-normalised intensities) are
written once to a cache folder in the temporary directory and reused by every child process.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import deep_supervision_scales, nnunet_training_loader

NAME = "augment"
GOAL = 2.0
THREADS = 1  # per-core throughput: both sides single-threaded

FULL = {"patch": 128, "batch": 2, "patches": 64, "cases": 4, "shape": (176, 224, 224)}
QUICK = {"patch": 64, "batch": 2, "patches": 32, "cases": 2, "shape": (96, 112, 112)}
N_STAGES = 6  # network stages of the 128^3 3d_fullres plan: 5 deep-supervision outputs
OVERSAMPLE = 0.33
LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}

WHAT = (
    f"{FULL['patches']} patches {FULL['patch']}^3 (batch {FULL['batch']}, initial patch 205^3) "
    f"from {FULL['cases']} cases {'x'.join(map(str, FULL['shape']))}: fg oversampling + "
    "rotation/scaling, noise, blur, brightness, contrast, low-res, gamma x2, mirror, DS targets"
)

_CONFIG = Path(__file__).resolve().parents[1] / "config" / "kits21.yaml"


def _sizes(quick: bool) -> dict[str, Any]:
    return QUICK if quick else FULL


def _augmentation() -> dict[str, Any]:
    """The ``augmentation`` section of the KiTS21 configuration kitsnet trains with."""
    import yaml

    return yaml.safe_load(_CONFIG.read_text())["augmentation"]


# ----------------------------------------------------------------------------- synthetic data


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return dist <= 1


def _case(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A KiTS-like preprocessed case: z-scored CT intensities and labels 0..3."""
    s = np.array(shape, dtype=float)
    seg = np.zeros(shape, np.uint8)
    for side in (0.3, 0.7):  # two kidneys left and right of the spine
        centre = s * [0.5, 0.55, side] + rng.uniform(-4, 4, 3)
        seg[_ellipsoid(shape, centre, s * [0.22, 0.12, 0.09])] = 1
    centre = s * [0.5, 0.55, 0.3] + [0, 0, s[2] * 0.05]
    seg[_ellipsoid(shape, centre, s * [0.07, 0.06, 0.05])] = 2
    seg[_ellipsoid(shape, s * [0.45, 0.5, 0.72], s * [0.03, 0.03, 0.03])] = 3
    mean = np.array([-0.8, 0.9, 0.5, -0.2], np.float32)[seg]
    image = (mean + rng.normal(0.0, 0.35, shape).astype(np.float32)).astype(np.float32)
    return image[None], seg


def _write_cases(root: Path, sizes: dict[str, Any]) -> None:
    """kitsnet's preprocessed layout in ``root/kitsnet``, nnU-Net's in ``root/nnunet``."""
    from kitsnet.preprocess import class_locations

    kits, nnu = root / "kitsnet", root / "nnunet"
    kits.mkdir(parents=True)
    nnu.mkdir(parents=True)
    rng = np.random.default_rng(2021)
    for i in range(sizes["cases"]):
        case = f"case_{i:05d}"
        image, seg = _case(tuple(sizes["shape"]), rng)
        locs = class_locations(seg, rng)
        np.save(kits / f"{case}_image.npy", image)
        np.save(kits / f"{case}_seg.npy", seg)
        (kits / f"{case}.json").write_text(
            json.dumps({"class_locations": locs, "shape": list(seg.shape)})
        )
        # nnU-Net: data (C, *S) float32, seg (1, *S) int8, locations with a channel column
        np.save(nnu / f"{case}.npy", image)
        np.save(nnu / f"{case}_seg.npy", seg[None].astype(np.int8))
        props = {
            "class_locations": {
                int(k): np.array([[0, *c] for c in v], dtype=np.int64).reshape(-1, 4)
                for k, v in locs.items()
            }
        }
        with open(nnu / f"{case}.pkl", "wb") as fh:
            pickle.dump(props, fh)
        (nnu / f"{case}.npz").touch()  # nnUNetDatasetNumpy finds identifiers by their .npz


def _data_root(sizes: dict[str, Any]) -> Path:
    """The cache folder of these sizes, written on first use (atomically, by rename)."""
    key = f"{sizes['cases']}x{'x'.join(map(str, sizes['shape']))}-v1"
    root = Path(tempfile.gettempdir()) / f"kitsnet-bench-augment-{key}"
    if not (root / "done").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        _write_cases(tmp, sizes)
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


# ----------------------------------------------------------------------------- pipelines


def _ds_scales(patch: int) -> list[float]:
    """Deep-supervision output scales of the plan's network (strides 2 while >= 8 voxels)."""
    return deep_supervision_scales(patch, N_STAGES)


def _kitsnet_pipeline(sizes: dict[str, Any], root: Path, cases: list[str]) -> Callable[[], float]:
    """One training iteration's data work in ``kitsnet.train.train_fold``: sample, augment,
    deep-supervision targets.  Returns a function making one batch (and a checksum of it)."""
    import torch

    from kitsnet.augment import augment_batch
    from kitsnet.loader import CaseStore, PatchSampler, augment_settings, region_size
    from kitsnet.loss import deep_supervision_weights, downsample_target

    augmentation = _augmentation()
    aug = augment_settings(augmentation, 3)
    patch = [sizes["patch"]] * 3
    store = CaseStore(cases, root / "kitsnet")
    region = region_size(patch, augmentation, 3)
    sampler = PatchSampler(store, region, patch, 3, OVERSAMPLE, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(0)
    scales = _ds_scales(sizes["patch"])
    weights = deep_supervision_weights(len(scales))
    # total_loss downsamples the target, as below, for every output it weighs (not the lowest)
    shapes = [[round(p * s) for p in patch] for s, w in zip(scales, weights, strict=True) if w]

    def batch() -> float:
        img, seg = sampler.sample(sizes["batch"], 0)
        img_t, seg_t = augment_batch(torch.from_numpy(img), torch.from_numpy(seg), patch, aug, gen)
        seg_t = seg_t.long()
        targets = [downsample_target(seg_t, shape) for shape in shapes]
        return float(img_t.sum()) + sum(float(t.sum()) for t in targets)

    return batch


def _peer_pipeline(sizes: dict[str, Any], root: Path, cases: list[str]) -> Callable[[], float]:
    """nnU-Net's training data loader with its 3d_fullres training transforms, called in the
    main process.  Returns a function making one batch (and a checksum of it)."""
    import torch

    loader = nnunet_training_loader(
        root / "nnunet", cases, sizes["patch"], sizes["batch"], N_STAGES, OVERSAMPLE
    )
    np.random.seed(0)  # nnU-Net's loader and transforms draw from the global generators
    torch.manual_seed(0)

    def batch() -> float:
        out = loader.generate_train_batch()
        return float(out["data"].sum()) + sum(float(t.sum()) for t in out["target"])

    return batch


# ----------------------------------------------------------------------------- protocol


def setup(quick: bool) -> dict[str, Any]:
    """The cached cases, and both pipelines opened on them: imports, reading the case index
    (kitsnet's class locations) and building the transforms happen once per training run, so
    they are not timed; only making the batches is."""
    sizes = _sizes(quick)
    root = _data_root(sizes)
    cases = [f"case_{i:05d}" for i in range(sizes["cases"])]
    inputs = {**sizes, "kitsnet": _kitsnet_pipeline(sizes, root, cases)}
    if peer_available() is None:
        inputs["peer"] = _peer_pipeline(sizes, root, cases)
    return inputs


def _run(inputs: dict[str, Any], side: str) -> list[float]:
    return [inputs[side]() for _ in range(inputs["patches"] // inputs["batch"])]


def run_kitsnet(inputs: dict[str, Any]) -> list[float]:
    return _run(inputs, "kitsnet")


def run_peer(inputs: dict[str, Any]) -> list[float]:
    return _run(inputs, "peer")


def peer_available() -> str | None:
    try:
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 not importable: {exc}"
    return None


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    """kitsnet's throughput; nnU-Net's is this divided by ``ratio`` (same patches, same core)."""
    n = _sizes(quick)["patches"]
    return {
        "patches": n,
        "kitsnet_patches_per_s_per_core": n / seconds,
        "ratio_means": "nnU-Net s / kitsnet s = kitsnet patches/s/core / nnU-Net patches/s/core",
    }
