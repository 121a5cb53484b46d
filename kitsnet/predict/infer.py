"""Inference of a fold: predict, export back to the original grid (the segmentation and, for
ensembling, the compact class probabilities), and the cascade's next stage (and, for a ROI
configuration, paste the boxes back first).  New scans: :mod:`kitsnet.predict.images`.

The sliding window itself is :mod:`kitsnet.predict.sliding_window` (re-exported here).  Logits stay
float32 (never float64) and are resampled to the original grid one channel at a time so a
1059 x 512 x 796 case stays within host memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kitsnet.core.io import load_json, save_volume
from kitsnet.core.regions import output_channels, plan_regions
from kitsnet.core.resample import resample_argmax
from kitsnet.model.checkpoint import load_checkpoint
from kitsnet.model.network import build_network
from kitsnet.predict.probabilities import CompactProbabilities, export_logits, save_probabilities
from kitsnet.predict.sliding_window import compute_steps, gaussian_importance, sliding_window
from kitsnet.preprocess.case import grid_spacing
from kitsnet.preprocess.roi import Box, load_manifest, paste_logits
from kitsnet.stages import find_previous_stage

Progress = Callable[[int, int], None]

__all__ = [
    "compute_steps",
    "gaussian_importance",
    "load_models",
    "logits_to_next_stage",
    "export_to_original",
    "logits_to_original",
    "predict_cropped_case",
    "predict_fold",
    "predict_volume",
    "sliding_window",
    "with_previous_stage",
    "write_prediction",
]


def predict_volume(
    networks: list[torch.nn.Module],
    image: np.ndarray,
    plan: dict,
    inference: dict,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Logits of a preprocessed (C, Z, Y, X) volume on its own grid; 2D plans go slice by slice.
    ``progress(done, total)`` counts tiles over the whole volume (all slices of a 2D plan)."""
    kw = dict(
        num_classes=output_channels(plan),
        step=inference["step_size"],
        sigma_scale=inference["gaussian_sigma_scale"],
        mirror=inference["mirror"],
        device=device,
        tile_batch=int(inference.get("tile_batch", 1)),
    )
    patch = list(plan["patch_size"])
    if plan["arch"]["dim"] == 3:
        return sliding_window(networks, image, patch, progress=progress, **kw)
    out = np.empty((output_channels(plan), *image.shape[1:]), dtype=np.float32)
    n_slices = image.shape[1]
    for z in range(n_slices):
        each = None
        if progress is not None:  # every slice has the same tiles

            def each(done: int, total: int, z: int = z) -> None:
                progress(z * total + done, n_slices * total)

        out[:, z] = sliding_window(networks, image[:, z], patch, progress=each, **kw)
    return out


def load_models(
    paths: list[str | Path], device: torch.device | str = "cpu"
) -> tuple[list[torch.nn.Module], dict]:
    """Load one or more fold models (same plan) for inference, deep supervision off."""
    nets, plan = [], None
    for p in paths:
        ck = load_checkpoint(Path(p))
        plan = json.loads(ck["plan"])
        net = build_network(plan["arch"], plan["in_channels"], output_channels(plan))
        net.load_state_dict(ck["state_dict"])
        net.deep_supervision = False
        nets.append(net.to(device).eval())
    assert plan is not None, "no model paths given"
    return nets, plan


def class_order(plan: dict) -> list[int] | None:
    """How the plan's logits become labels: None (arg-max over classes), or a region-based
    plan's ``regions_class_order`` (:mod:`kitsnet.core.regions`)."""
    regions = plan_regions(plan)
    return regions[1] if regions else None


def logits_to_original(logits: np.ndarray, geometry: dict, plan: dict) -> np.ndarray:
    """Labels on the original grid: logits resampled linearly and arg-maxed (regions:
    thresholded and painted in class order), slab by slab.

    The logits are on the case's grid for ``plan`` (a 2D plan's grid keeps the case's own
    slice spacing, :func:`kitsnet.preprocess.case.grid_spacing`)."""
    original = geometry["original_spacing"]
    return resample_argmax(
        logits,
        geometry["original_shape"],
        grid_spacing(plan, original),
        plan["anisotropy_threshold"],
        new_spacing=original,
        class_order=class_order(plan),
    )


def export_to_original(
    logits: np.ndarray, geometry: dict, plan: dict
) -> tuple[np.ndarray, CompactProbabilities]:
    """:func:`logits_to_original` (the same labels, byte for byte) and the class probabilities
    on the original grid in compact form (:mod:`kitsnet.predict.probabilities`), which the
    ensembles of model selection average."""
    original = geometry["original_spacing"]
    return export_logits(
        logits,
        geometry["original_shape"],
        grid_spacing(plan, original),
        plan["anisotropy_threshold"],
        new_spacing=original,
        class_order=class_order(plan),
    )


def logits_to_next_stage(
    logits: np.ndarray, shape: list[int], plan: dict, spacing: list[float]
) -> np.ndarray:
    """Lowres logits resampled (linear) to the fullres grid and arg-maxed (regions: see
    :func:`logits_to_original`) -> uint8 labels."""
    return resample_argmax(
        logits, shape, spacing, plan["anisotropy_threshold"], class_order=class_order(plan)
    )


def write_prediction(seg: np.ndarray, geometry: dict, out_path: str | Path) -> None:
    """Write a label map with exactly the input image's affine, zooms and sform/qform codes."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr["sform_code"], hdr["qform_code"] = geometry["sform_code"], geometry["qform_code"]
    save_volume(
        seg.astype(np.uint8),
        out_path,
        np.array(geometry["affine"]),
        header=hdr,
        spacing=tuple(geometry["original_spacing"]),
    )


def with_previous_stage(image: np.ndarray, prev: np.ndarray, num_classes: int) -> np.ndarray:
    """The cascade's input: the image channels and the previous stage's labels 1..K-1 one-hot
    (float32), as the network of a configuration with a previous stage takes them."""
    onehot = np.stack([prev == k for k in range(1, num_classes)]).astype(np.float32)
    return np.concatenate([image, onehot])


def predict_cropped_case(
    networks: list[torch.nn.Module],
    plan: dict,
    inference: dict,
    case_dir: Path,
    device: torch.device | str = "cpu",
    log=print,
) -> tuple[np.ndarray, dict]:
    """A cropped case (:mod:`kitsnet.preprocess.roi`): the sliding window on each of its boxes,
    with that box's previous stage, pasted onto the whole fullres grid (background outside the
    boxes).  Returns those logits and the manifest, which holds the geometry export needs."""
    manifest = load_manifest(case_dir)
    if manifest["fallback"]:
        log(f"{manifest['case']}: the first stage found nothing; predicting the whole volume")
    parts = []
    for item in manifest["items"]:
        image = np.load(case_dir / f"{item}_image.npy")
        prev = np.load(case_dir / f"{item}_prev.npy")
        image = with_previous_stage(image, prev, plan["num_classes"])
        parts.append(predict_volume(networks, image, plan, inference, device))
    boxes = [Box.from_json(b) for b in manifest["boxes"]]
    regions = class_order(plan) is not None
    return paste_logits(parts, boxes, manifest["shape"], regions), manifest


def predict_fold(
    model_path: str | Path,
    cases: list[str],
    data_dir: str | Path,
    out_dir: str | Path,
    inference: dict,
    prev_dirs: list[str | Path] | None = None,
    next_stage: tuple[str | Path, str | Path] | None = None,
    device: str = "auto",
    log=print,
    prob_dir: str | Path | None = None,
) -> None:
    """Predict a fold's validation cases from their preprocessed arrays.

    Writes ``out_dir/<case>.nii.gz`` on the original grid; with ``prob_dir`` also the class
    probabilities as ``prob_dir/<case>.npz`` (compact, :mod:`kitsnet.predict.probabilities`);
    with ``next_stage=(fullres_dir, out)`` the segmentation resampled to the fullres grid as
    ``out/<case>.npy``.
    """
    from kitsnet.core.device import pick_device

    dev = pick_device(device)
    nets, plan = load_models([model_path], dev)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if prob_dir is not None:
        Path(prob_dir).mkdir(parents=True, exist_ok=True)
    for case in cases:
        if plan.get("roi"):
            logits, geometry = predict_cropped_case(
                nets, plan, inference, data_dir / case, dev, log
            )
        else:
            image = np.load(data_dir / f"{case}_image.npy")
            geometry = load_json(data_dir / f"{case}.json")
            if prev_dirs:
                image = with_previous_stage(
                    image, np.load(find_previous_stage(case, prev_dirs)), plan["num_classes"]
                )
            logits = predict_volume(nets, image, plan, inference, dev)
        if prob_dir is None:
            seg = logits_to_original(logits, geometry, plan)
        else:
            seg, probabilities = export_to_original(logits, geometry, plan)
            save_probabilities(Path(prob_dir) / f"{case}.npz", probabilities)
        write_prediction(seg, geometry, out_dir / f"{case}.nii.gz")
        if next_stage is not None:
            full_dir, ns_dir = Path(next_stage[0]), Path(next_stage[1])
            full_shape = load_json(full_dir / f"{case}.json")["shape"]
            seg = logits_to_next_stage(logits, full_shape, plan, plan["spacing"])
            from kitsnet.core.io import atomic_path

            ns_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(ns_dir / f"{case}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, seg)
        log(f"predicted {case}")
