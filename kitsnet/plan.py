"""Dataset fingerprint, per-configuration plans, and cross-validation splits.

The plan is the single place where a configuration's numbers live (target spacing, patch, batch,
network widths and strides, CT normalisation).  Every later stage reads the plan file; nothing
downstream re-derives or hard-codes these values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import load_volume

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
NUM_CLASSES = 4  # background, kidney, tumor, cyst
# Which preprocessed data each configuration trains on; 2D and the cascade reuse the fullres
# arrays as nnU-Net does, so each case is resampled once per resolution, not per configuration.
DATA_OF = {
    "2d": "3d_fullres",
    "3d_fullres": "3d_fullres",
    "3d_lowres": "3d_lowres",
    "3d_cascade_fullres": "3d_fullres",
}
PREVIOUS_STAGE = {"3d_cascade_fullres": "3d_lowres"}


def fingerprint(
    pairs: list[tuple[str, str | Path, str | Path]], samples_per_case: int = 10000, seed: int = 1234
) -> dict:
    """Spacings, shapes and foreground-intensity statistics of the dataset.

    Foreground voxels (label > 0) are subsampled per case with a fixed seed, as nnU-Net does,
    so the statistics are deterministic and cheap to hold in memory for 300 cases.
    """
    rng = np.random.default_rng(seed)
    spacings, shapes, samples = [], [], []
    for case, image_file, label_file in pairs:
        img = load_volume(image_file, case)
        lab = load_volume(label_file, case)
        spacings.append(list(img.spacing))
        shapes.append(list(img.array.shape))
        fg = np.asarray(img.array)[np.asarray(lab.array) > 0].astype(np.float64)
        if fg.size:
            take = min(samples_per_case, fg.size)
            samples.append(rng.choice(fg, size=take, replace=False))
    values = np.concatenate(samples) if samples else np.zeros(1)
    return {
        "cases": [case for case, _, _ in pairs],
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": np.median(np.array(spacings), axis=0).tolist(),
        "median_shape": np.median(np.array(shapes), axis=0).tolist(),
        "foreground_intensity": {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5)),
            "min": float(values.min()),
            "max": float(values.max()),
            "n_samples": int(values.size),
        },
    }


def features_per_stage(base: int, cap: int, n_stages: int) -> list[int]:
    """Widths doubling from ``base`` per resolution step, capped (30 -> 320 in the paper)."""
    return [min(base * 2**i, cap) for i in range(n_stages)]


def _median_shape_at(fp: dict, spacing: list[float]) -> list[float]:
    med_mm = np.median(np.array(fp["shapes"]) * np.array(fp["spacings"]), axis=0)
    return (med_mm / np.array(spacing)).tolist()


def auto_lowres_spacing(fp: dict, fullres_spacing: list[float], patch: list[int]) -> list[float]:
    """nnU-Net's rule: grow the spacing by 3% until one patch covers >= 1/4 of the median case."""
    spacing = np.array(fullres_spacing, dtype=float)
    for _ in range(1000):
        shape = np.array(_median_shape_at(fp, spacing.tolist()))
        if np.prod(patch) >= 0.25 * np.prod(shape):
            break
        spacing *= 1.03
    return spacing.tolist()


def _strides(patch: list[int], n_stages: int) -> list[list[int]]:
    """Stride 1 at the top, then 2 along every axis still large enough to be halved."""
    strides, size = [[1] * len(patch)], list(patch)
    for _ in range(n_stages - 1):
        s = [2 if sz >= 8 else 1 for sz in size]
        size = [sz // st for sz, st in zip(size, s, strict=True)]
        strides.append(s)
    return strides


def make_plan(configuration: str, fp: dict, cfg: dict) -> dict:
    """The plan of one configuration from the fingerprint and the ``plan`` section of config."""
    pc = cfg["plan"]
    fi = fp["foreground_intensity"]
    fullres = [float(s) for s in pc["fullres_spacing"]]
    if configuration == "2d":
        dim, patch, batch = 2, list(pc["patch_size_2d"]), int(pc["batch_size_2d"])
        n_stages, cap, spacing = int(pc["n_stages_2d"]), int(pc["max_features_2d"]), fullres
    else:
        dim, batch = 3, int(pc["batch_size_3d"])
        n_stages, cap = int(pc["n_stages_3d"]), int(pc["max_features_3d"])
        if configuration == "3d_lowres":
            patch = list(pc.get("patch_size_lowres") or pc["patch_size_3d"])
            if pc.get("lowres_spacing") in (None, "auto"):
                spacing = auto_lowres_spacing(fp, fullres, patch)
            else:
                spacing = [float(s) for s in pc["lowres_spacing"]]
        else:
            patch, spacing = list(pc["patch_size_3d"]), fullres
    prev = PREVIOUS_STAGE.get(configuration)
    return {
        "configuration": configuration,
        "data": DATA_OF[configuration],
        "previous_stage": prev,
        "spacing": spacing,
        "patch_size": patch,
        "batch_size": batch,
        "num_classes": NUM_CLASSES,
        # image + one-hot channels for labels 1..3 of the previous stage's segmentation
        "in_channels": 1 + (NUM_CLASSES - 1 if prev else 0),
        "median_shape": _median_shape_at(fp, spacing),
        "normalization": {
            "scheme": "CT",
            "clip": [fi["percentile_00_5"], fi["percentile_99_5"]],
            "mean": fi["mean"],
            "std": fi["std"],
        },
        "anisotropy_threshold": float(pc.get("anisotropy_threshold", 3.0)),
        "arch": {
            "dim": dim,
            "features_per_stage": features_per_stage(int(pc["base_features"]), cap, n_stages),
            "strides": _strides(patch, n_stages),
            "kernel_sizes": [[3] * dim for _ in range(n_stages)],
            "n_conv_per_stage": int(pc.get("n_conv_per_stage", 2)),
            "n_conv_per_stage_decoder": int(pc.get("n_conv_per_stage_decoder", 2)),
            "deep_supervision": bool(pc.get("deep_supervision", True)),
        },
    }


def make_splits(cases: list[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """sklearn ``KFold(n_splits, shuffle=True, random_state=seed)`` over sorted case ids.

    Re-implemented (not imported) so the workflow needs no scikit-learn, with the same
    arithmetic: a ``RandomState(seed)`` shuffle of the indices, the first ``n % k`` folds one
    larger, and train/val lists in sorted order; nnU-Net v2 builds its splits the same way.
    """
    keys = np.sort(np.array(cases))
    n = len(keys)
    if n < n_folds:
        raise ValueError(f"{n} cases cannot be split into {n_folds} folds")
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val_mask = np.zeros(n, bool)
        val_mask[idx[start : start + size]] = True
        start += size
        splits.append({"train": keys[~val_mask].tolist(), "val": keys[val_mask].tolist()})
    return splits


def target_shape(
    shape: tuple[int, ...], spacing: list[float], new_spacing: list[float]
) -> list[int]:
    return [
        max(1, int(round(s * sp / ns)))
        for s, sp, ns in zip(shape, spacing, new_spacing, strict=True)
    ]


def load_or_make_splits(
    cases: list[str], n_folds: int, seed: int, splits_file: str | None = None
) -> list[dict]:
    """An existing splits file is honoured (checked against the cases), else KFold splits."""
    if not splits_file:
        return make_splits(cases, n_folds, seed)
    from .io import KitsnetError, load_json

    splits = load_json(splits_file)
    if len(splits) != n_folds:
        raise KitsnetError(f"{splits_file}: {len(splits)} folds, config says folds={n_folds}")
    val = sorted(c for s in splits for c in s["val"])
    if val != sorted(cases):
        raise KitsnetError(
            f"{splits_file}: validation cases do not cover the dataset's cases exactly once"
        )
    return splits
