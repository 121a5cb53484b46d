"""The per-configuration plans, made from the dataset fingerprint and the config.

The plan is the single place where a configuration's numbers live (target spacing, patch, batch,
network widths and strides, CT normalisation).  Every later stage reads the plan file; nothing
downstream re-derives or hard-codes these values.  The fingerprint it starts from is
:mod:`kitsnet.plan.fingerprint`; the cross-validation splits are :mod:`kitsnet.plan.splits`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kitsnet.core.io import KitsnetError
from kitsnet.core.regions import region_settings
from kitsnet.plan.topology import Topology, batch_size_for, fit_patch, pool_and_conv_props
from kitsnet.stages import (
    CONFIGURATIONS,
    DATA_OF,
    MODES,
    NUM_CLASSES,
    PREVIOUS_STAGE,
    ROI_CONFIGURATIONS,
    ROI_DEFAULTS,
    base_configuration,
    is_region_based,
)


def features_per_stage(base: int, cap: int, n_stages: int) -> list[int]:
    """Widths doubling from ``base`` per stage, never above ``cap`` (nnU-Net's
    ``min(base * 2**s, cap)``): 30 -> 320 over 6 stages in the paper's 3D networks."""
    if base <= 0 or cap <= 0 or n_stages <= 0:
        raise ValueError(f"base, cap and n_stages must be positive, got {base}, {cap}, {n_stages}")
    return [min(base * 2**i, cap) for i in range(n_stages)]


def median_shape_at(fp: dict, spacing: list[float]) -> list[float]:
    """Median over cases of each case's shape resampled to ``spacing`` (nnU-Net's planner: the
    per-case shapes are rounded first, then the median is taken; it may end in .5)."""
    pairs = zip(fp["shapes"], fp["spacings"], strict=True)
    shapes = [target_shape(sh, sp, spacing) for sh, sp in pairs]
    return np.median(np.array(shapes, dtype=np.float64), axis=0).tolist()


def auto_lowres_spacing(
    fullres: list[float], full_median: list[float], patch_voxels: Callable[[list[float]], int]
) -> list[float]:
    """nnU-Net's 3d_lowres spacing: grow the fullres spacing by 3% per step (the finer axes
    first while any is more than 2x finer than the coarsest) until one patch covers at least a
    quarter of the median image.  ``patch_voxels(spacing)`` is the patch at that spacing (fixed,
    or re-planned at every step as nnU-Net does for an ``auto`` patch)."""
    spacing = np.array(fullres, dtype=np.float64)
    scale = np.array(fullres) * np.array(full_median)
    for _ in range(1000):
        median_voxels = float(np.prod(scale / spacing))
        if median_voxels and patch_voxels(spacing.tolist()) / median_voxels >= 0.25:
            break
        fine = spacing.max() / spacing > 2
        spacing[fine if fine.any() else slice(None)] *= 1.03
    return spacing.tolist()


def _grid(configuration: str, fp: dict, pc: dict, features) -> dict:
    """Target spacing, median image and dataset size (in voxels) of one configuration."""
    fullres = [float(s) for s in pc["fullres_spacing"]]
    full_median = median_shape_at(fp, fullres)
    n_cases = len(fp["shapes"])
    if configuration == "2d":
        # nnU-Net's 2D grid: in-plane axes at the fullres spacing; every case keeps its own
        # slice spacing (see kitsnet.preprocess.case.grid_spacing)
        return {
            "spacing": fullres[1:],
            "median": full_median[1:],
            "voxels": float(np.prod(full_median)) * n_cases,
            "patch": pc["patch_size_2d"],
            "batch": pc["batch_size_2d"],
            "n_stages": pc.get("n_stages_2d"),
        }
    grid = {
        "spacing": fullres,
        "median": full_median,
        "voxels": float(np.prod(full_median)) * n_cases,
        "patch": pc["patch_size_3d"],
        "batch": pc["batch_size_3d"],
        "n_stages": pc.get("n_stages_3d"),
    }
    if configuration == "3d_lowres":
        if pc.get("patch_size_lowres") is not None:
            grid["patch"] = pc["patch_size_lowres"]

        def lowres_median(low: list[float]) -> np.ndarray:
            return np.array(fullres) / np.array(low) * np.array(full_median)

        def patch_voxels(low: list[float]) -> int:
            at = {**grid, "median": [float(round(v)) for v in lowres_median(low)]}
            return int(np.prod(_topology(at, low, features, pc).patch_size))

        low = pc.get("lowres_spacing")
        if low in (None, "auto"):
            low = auto_lowres_spacing(fullres, full_median, patch_voxels)
        low = [float(s) for s in low]
        exact = lowres_median(low)
        grid.update(
            spacing=low,
            median=[float(round(v)) for v in exact],
            voxels=float(np.prod(exact)) * n_cases,
        )
    return grid


def _topology(grid: dict, spacing: list[float], features, pc: dict) -> Topology:
    """The patch (given, or ``auto``: nnU-Net's memory rule) and its nnU-Net topology."""
    if grid["patch"] == "auto":
        return fit_patch(
            spacing, grid["median"], features, NUM_CLASSES, float(pc.get("gpu_memory_gb", 8.0))
        )
    return pool_and_conv_props(spacing, [int(p) for p in grid["patch"]])


def _limit_stages(topo: Topology, n_stages: int | None, configuration: str) -> Topology:
    """A configured ``n_stages_*`` may make the network shallower than the rule, never deeper."""
    if n_stages is None or int(n_stages) == topo.n_stages:
        return topo
    n = int(n_stages)
    if not 2 <= n <= topo.n_stages:
        raise KitsnetError(
            f"plan: {configuration} allows 2..{topo.n_stages} stages for patch "
            f"{topo.patch_size} (nnU-Net's topology rule), the config asks for {n}"
        )
    dim = len(topo.patch_size)
    return Topology(topo.strides[:n], topo.kernel_sizes[: n - 1] + [[3] * dim], topo.patch_size)


def make_plan(configuration: str, fp: dict, cfg: dict) -> dict:
    """The plan of one configuration from the fingerprint and the ``plan`` section of config.

    Spacing and patch come from the config (or nnU-Net's rules where they say ``auto``); the
    depth, strides and kernels always follow from them by nnU-Net's topology rule
    (:mod:`kitsnet.plan.topology`); widths double from ``base_features`` up to the 2D or 3D cap.
    A region-based configuration (``<base>_regions``) has its base's plan and the regions
    (:mod:`kitsnet.core.regions`).
    """
    if configuration not in CONFIGURATIONS:
        raise KitsnetError(f"unknown configuration {configuration!r} (one of {CONFIGURATIONS})")
    base = base_configuration(configuration)
    pc = cfg["plan"]
    fi = fp["foreground_intensity"]
    dim = 2 if base == "2d" else 3
    cap = int(pc["max_features_2d"] if dim == 2 else pc["max_features_3d"])

    def features(n: int) -> list[int]:
        return features_per_stage(int(pc["base_features"]), cap, n)

    grid = _grid(base, fp, pc, features)
    topo = _topology(grid, grid["spacing"], features, pc)
    topo = _limit_stages(topo, grid["n_stages"], configuration)
    batch = grid["batch"]
    if batch == "auto":
        batch = batch_size_for(
            topo, features, NUM_CLASSES, grid["voxels"], float(pc.get("gpu_memory_gb", 8.0))
        )
    batch_dice = pc.get("batch_dice", "auto")
    prev = PREVIOUS_STAGE.get(configuration)
    extra = {"roi": roi_settings(pc)} if configuration in ROI_CONFIGURATIONS else {}
    if is_region_based(configuration):
        extra.update(region_settings())
    return {
        "configuration": configuration,
        "data": DATA_OF[configuration],
        "previous_stage": prev,
        "spacing": grid["spacing"],
        "patch_size": topo.patch_size,
        "batch_size": int(batch),
        # nnU-Net's planner: per-sample Dice for 3d_lowres, batch Dice for the others
        "batch_dice": base != "3d_lowres" if batch_dice == "auto" else bool(batch_dice),
        "num_classes": NUM_CLASSES,
        # image + one-hot channels for labels 1..3 of the previous stage's segmentation
        "in_channels": 1 + (NUM_CLASSES - 1 if prev else 0),
        "median_shape": grid["median"],
        "normalization": {
            "scheme": "CT",
            "clip": [fi["percentile_00_5"], fi["percentile_99_5"]],
            "mean": fi["mean"],
            "std": fi["std"],
        },
        "anisotropy_threshold": float(pc.get("anisotropy_threshold", 3.0)),
        "arch": {
            "dim": dim,
            "features_per_stage": features(topo.n_stages),
            "strides": topo.strides,
            "kernel_sizes": topo.kernel_sizes,
            "n_conv_per_stage": int(pc.get("n_conv_per_stage", 2)),
            "n_conv_per_stage_decoder": int(pc.get("n_conv_per_stage_decoder", 2)),
            "deep_supervision": bool(pc.get("deep_supervision", True)),
        },
        **extra,
    }


def roi_settings(pc: dict) -> dict:
    """The region of interest of a ROI configuration (:mod:`kitsnet.preprocess.roi`) from the
    config's ``plan`` section: ``roi_margin_mm`` around the first stage's foreground,
    ``roi_boxes`` ``single`` (one box around both kidneys) or ``per_kidney``."""

    roi = {
        "margin_mm": float(pc.get("roi_margin_mm", ROI_DEFAULTS["margin_mm"])),
        "boxes": str(pc.get("roi_boxes", ROI_DEFAULTS["boxes"])),
    }
    if roi["margin_mm"] < 0 or roi["boxes"] not in MODES:
        raise KitsnetError(
            f"plan: roi_margin_mm must be >= 0 and roi_boxes one of {MODES}, got "
            f"{roi['margin_mm']} and {roi['boxes']!r}"
        )
    return roi


def target_shape(
    shape: tuple[int, ...] | list[int], spacing: list[float], new_spacing: list[float]
) -> list[int]:
    """The shape on a grid of ``new_spacing``: round(spacing / new_spacing x shape), computed in
    that order as nnU-Net's ``compute_new_shape`` does, so both round .5 cases alike."""
    return [
        max(1, int(round(sp / ns * s)))
        for s, sp, ns in zip(shape, spacing, new_spacing, strict=True)
    ]
