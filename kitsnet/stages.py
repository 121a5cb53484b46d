"""The configuration graph: which configurations exist, what data each trains on, which stage
comes before it, and the region-of-interest modes of the coarse-to-fine cascade.

Every stage package reads these names (the planner, preprocessing, training, prediction, the
report and the workflow's rules), so they live here, below all of them; this module imports
only :mod:`kitsnet.core`.
"""

from __future__ import annotations

from pathlib import Path

from kitsnet.core.io import KitsnetError

# The paper's configurations (nnU-Net's, plus the paper's region-of-interest cascade).
BASE_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres", "3d_cascade_roi")
NUM_CLASSES = 4  # background, kidney, tumor, cyst
# Region-based training (nnU-Net v2's recipe for KiTS): "<configuration>_regions" is that
# configuration trained with one sigmoid output per KiTS region instead of a softmax over the
# labels; the same data, previous stage, sampler and augmentation (kitsnet.core.regions).
REGION_SUFFIX = "_regions"
CONFIGURATIONS = BASE_CONFIGURATIONS + tuple(c + REGION_SUFFIX for c in BASE_CONFIGURATIONS)


def is_region_based(configuration: str) -> bool:
    """Whether ``configuration`` trains on the KiTS regions (sigmoid outputs)."""
    return configuration.endswith(REGION_SUFFIX)


def base_configuration(configuration: str) -> str:
    """The configuration whose plan, data and previous stage a region-based one shares
    (``3d_fullres_regions`` -> ``3d_fullres``); a label-based one is its own base."""
    return configuration.removesuffix(REGION_SUFFIX)


# Which preprocessed data each configuration trains on.  The cascade reuses the fullres arrays
# as nnU-Net does; 2D has its own (in-plane at the fullres spacing, each case keeping its slice
# spacing), so each case is preprocessed once per data kind, not per configuration.
# 3d_cascade_roi is on the fullres grid too, but trains on crops of those arrays
# (ROI_CONFIGURATIONS, kitsnet.preprocess.roi), which its own per-case step writes.
_BASE_DATA = {
    "2d": "2d",
    "3d_fullres": "3d_fullres",
    "3d_lowres": "3d_lowres",
    "3d_cascade_fullres": "3d_fullres",
    "3d_cascade_roi": "3d_fullres",
}
DATA_OF = {c: _BASE_DATA[base_configuration(c)] for c in CONFIGURATIONS}
# a region-based cascade takes the label-based first stage's segmentation, as its base does
PREVIOUS_STAGE = {
    c: "3d_lowres"
    for c in CONFIGURATIONS
    if base_configuration(c) in ("3d_cascade_fullres", "3d_cascade_roi")
}
# configurations whose cases are cropped to the previous stage's region of interest
ROI_CONFIGURATIONS = ("3d_cascade_roi", "3d_cascade_roi_regions")
ROI_DEFAULTS = {"margin_mm": 20.0, "boxes": "single"}
# what a training fold leaves for prediction (results/models/<config>/fold_k/)
FINAL_MODEL = "model_final.pt"  # the network after the last epoch
BEST_MODEL = "model_best.pt"  # the network of the epoch with the best EMA pseudo-Dice
# how a ROI configuration draws its boxes (kitsnet.preprocess.roi.foreground_boxes)
MODES = ("single", "per_kidney")


def find_previous_stage(case: str, prev_dirs: list[str | Path]) -> Path:
    """The previous stage's segmentation of ``case``: exactly one fold predicted it."""
    hits = [Path(d) / f"{case}.npy" for d in prev_dirs if (Path(d) / f"{case}.npy").is_file()]
    if len(hits) != 1:
        raise KitsnetError(
            f"{case}: expected one previous-stage segmentation in {prev_dirs}, found {len(hits)}"
        )
    return hits[0]
