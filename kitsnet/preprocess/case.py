"""Preprocessing of one case to a plan's grid: CT normalisation, resampling
(``kitsnet.core.resample``) and the foreground locations the training loader oversamples.

What nnU-Net's ``DefaultPreprocessor`` does for a CT dataset (checked against it in
``tests/nnunet/test_preprocess_nnunet.py``): clip to the foreground 0.5/99.5 percentiles and
z-score with the foreground mean and std, resample the image with a cubic spline and the labels
label-safely, remember up to 10,000 voxels of each class.  3D plans resample to their spacing; a
2D plan keeps each case's slice spacing (:func:`grid_spacing`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kitsnet.core.io import load_volume, save_json
from kitsnet.core.resample import Spacing, resample, resample_labels

N_CLASS_LOCATIONS = 10000  # foreground voxels remembered per class for oversampling
MIN_COVERAGE = 0.01  # ... but at least this fraction of a class's voxels (nnU-Net's rule)


def normalize_ct(image: np.ndarray, norm: dict) -> np.ndarray:
    """nnU-Net's CT scheme: clip to the foreground 0.5/99.5 percentiles, then z-score."""
    lo, hi = norm["clip"]
    out = np.clip(np.asarray(image, dtype=np.float32), lo, hi)
    out -= np.float32(norm["mean"])
    out /= np.float32(max(norm["std"], 1e-8))
    return out


def class_locations(seg: np.ndarray, rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Voxel coordinates per foreground class, for oversampling: as nnU-Net, up to
    N_CLASS_LOCATIONS of them, but at least 1% of the class's voxels (large tumours)."""
    locs: dict[str, list[list[int]]] = {}
    for label in (1, 2, 3):
        coords = np.argwhere(seg == label)
        keep = max(min(N_CLASS_LOCATIONS, len(coords)), math.ceil(len(coords) * MIN_COVERAGE))
        if len(coords) > keep:
            coords = coords[rng.choice(len(coords), keep, replace=False)]
        locs[str(label)] = coords.tolist()
    return locs


def grid_spacing(plan: dict, spacing: Spacing) -> list[float]:
    """The spacing a case is resampled to for ``plan``.

    3D plans give all three.  A 2D plan gives the in-plane spacing only: each case keeps its
    own slice spacing (axis 0), as nnU-Net's preprocessor does for a 2D configuration, so no
    slice is interpolated and the network sees every acquired slice.
    """
    target = [float(s) for s in plan["spacing"]]
    if len(target) == len(spacing):
        return target
    return [float(spacing[0]), *target]


def preprocess_image(
    image: np.ndarray, spacing: list[float] | tuple[float, ...], plan: dict
) -> np.ndarray:
    """Normalise then resample one CT volume to the plan's grid -> (1, *S) float32."""
    from kitsnet.plan.planner import target_shape

    new_spacing = grid_spacing(plan, spacing)
    shape = target_shape(image.shape, list(spacing), new_spacing)
    norm = normalize_ct(image, plan["normalization"])
    return resample(norm, shape, 3, spacing, plan["anisotropy_threshold"], new_spacing=new_spacing)[
        None
    ]


def geometry_of(vol, case: str) -> dict:
    """What export needs to undo resampling and write the input's exact geometry."""
    hdr = vol.header
    return {
        "case": case,
        "original_shape": list(vol.array.shape),
        "original_spacing": list(vol.spacing),
        "affine": vol.affine.tolist(),
        "sform_code": int(hdr["sform_code"]) if hdr is not None else 2,
        "qform_code": int(hdr["qform_code"]) if hdr is not None else 0,
    }


def preprocess_case(
    image_file: str | Path,
    label_file: str | Path,
    case: str,
    plan: dict,
    out_image: str | Path,
    out_seg: str | Path,
    out_json: str | Path,
    seed: int = 0,
) -> None:
    """Preprocess one KiTS21 case to the plan's grid.

    Writes ``image`` (1, *S) float32 and ``seg`` (*S) uint8 as separate ``.npy`` files so the
    training loader can memory-map them (a fullres KiTS21 case is hundreds of MB), and a JSON
    with the geometry and the foreground class locations.
    """
    from kitsnet.core.io import atomic_path
    from kitsnet.plan.planner import target_shape

    img = load_volume(image_file, case)
    lab = load_volume(label_file, case)
    image = preprocess_image(np.asarray(img.array), img.spacing, plan)
    new_spacing = grid_spacing(plan, img.spacing)
    shape = target_shape(img.array.shape, list(img.spacing), new_spacing)
    seg = resample_labels(
        np.asarray(lab.array).astype(np.uint8),
        shape,
        img.spacing,
        plan["anisotropy_threshold"],
        new_spacing=new_spacing,
    )
    rng = np.random.default_rng([seed, int(case.split("_")[1])])
    props = geometry_of(img, case)
    props.update(
        {
            "shape": list(seg.shape),
            "spacing": new_spacing,
            "class_locations": class_locations(seg, rng),
        }
    )
    for arr, path in ((image, out_image), (seg, out_seg)):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
    save_json(props, out_json)
