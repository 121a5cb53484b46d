"""Inference of a fold or an ensemble: predict, export back to the original grid, and the
cascade's next stage (and, for a ROI configuration, paste the boxes back first).

The sliding window itself is :mod:`kitsnet.predict.sliding_window` (re-exported here).  Logits stay
float32 (never float64) and are resampled to the original grid one channel at a time so a
1059 x 512 x 796 case stays within host memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kitsnet.core.io import load_json, save_volume
from kitsnet.core.resample import resample_argmax
from kitsnet.model.checkpoint import load_checkpoint
from kitsnet.model.network import build_network
from kitsnet.predict.sliding_window import compute_steps, gaussian_importance, sliding_window
from kitsnet.preprocess.case import grid_spacing
from kitsnet.preprocess.roi import Box, load_manifest, paste_logits, region_boxes
from kitsnet.stages import FINAL_MODEL, find_previous_stage

__all__ = [
    "compute_steps",
    "gaussian_importance",
    "load_models",
    "logits_to_next_stage",
    "logits_to_original",
    "predict_cropped_case",
    "predict_fold",
    "predict_images",
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
) -> np.ndarray:
    """Logits of a preprocessed (C, Z, Y, X) volume on its own grid; 2D plans go slice by slice."""
    kw = dict(
        num_classes=plan["num_classes"],
        step=inference["step_size"],
        sigma_scale=inference["gaussian_sigma_scale"],
        mirror=inference["mirror"],
        device=device,
        tile_batch=int(inference.get("tile_batch", 1)),
    )
    patch = list(plan["patch_size"])
    if plan["arch"]["dim"] == 3:
        return sliding_window(networks, image, patch, **kw)
    out = np.empty((plan["num_classes"], *image.shape[1:]), dtype=np.float32)
    for z in range(image.shape[1]):
        out[:, z] = sliding_window(networks, image[:, z], patch, **kw)
    return out


def load_models(
    paths: list[str | Path], device: torch.device | str = "cpu"
) -> tuple[list[torch.nn.Module], dict]:
    """Load one or more fold models (same plan) for inference, deep supervision off."""
    nets, plan = [], None
    for p in paths:
        ck = load_checkpoint(Path(p))
        plan = json.loads(ck["plan"])
        net = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
        net.load_state_dict(ck["state_dict"])
        net.deep_supervision = False
        nets.append(net.to(device).eval())
    assert plan is not None, "no model paths given"
    return nets, plan


def logits_to_original(logits: np.ndarray, geometry: dict, plan: dict) -> np.ndarray:
    """Labels on the original grid: logits resampled linearly and arg-maxed, slab by slab.

    The logits are on the case's grid for ``plan`` (a 2D plan's grid keeps the case's own
    slice spacing, :func:`kitsnet.preprocess.case.grid_spacing`)."""
    original = geometry["original_spacing"]
    return resample_argmax(
        logits,
        geometry["original_shape"],
        grid_spacing(plan, original),
        plan["anisotropy_threshold"],
        new_spacing=original,
    )


def logits_to_next_stage(
    logits: np.ndarray, shape: list[int], plan: dict, spacing: list[float]
) -> np.ndarray:
    """Lowres logits resampled (linear) to the fullres grid and arg-maxed -> uint8 labels."""
    return resample_argmax(logits, shape, spacing, plan["anisotropy_threshold"])


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
    return paste_logits(parts, boxes, manifest["shape"]), manifest


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
) -> None:
    """Predict a fold's validation cases from their preprocessed arrays.

    Writes ``out_dir/<case>.nii.gz`` on the original grid; with ``next_stage=(fullres_dir,
    out)`` also writes the segmentation resampled to the fullres grid as ``out/<case>.npy``.
    """
    from kitsnet.core.device import pick_device

    dev = pick_device(device)
    nets, plan = load_models([model_path], dev)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        write_prediction(
            logits_to_original(logits, geometry, plan), geometry, out_dir / f"{case}.nii.gz"
        )
        if next_stage is not None:
            full_dir, ns_dir = Path(next_stage[0]), Path(next_stage[1])
            full_shape = load_json(full_dir / f"{case}.json")["shape"]
            seg = logits_to_next_stage(logits, full_shape, plan, plan["spacing"])
            from kitsnet.core.io import atomic_path

            ns_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(ns_dir / f"{case}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, seg)
        log(f"predicted {case}")


def _inputs(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs: a single .nii.gz, a folder of them, or a KiTS21-layout folder."""
    if path.is_file():
        name = path.name.removesuffix(".nii.gz")
        return [(path.parent.name if name == "imaging" else name, path)]
    kits = sorted(path.glob("case_*/imaging.nii.gz"))
    if kits:
        return [(p.parent.name, p) for p in kits]
    return [(p.name.removesuffix(".nii.gz"), p) for p in sorted(path.glob("*.nii.gz"))]


def predict_images(
    models_dir: Path,
    input_path: Path,
    out_dir: Path,
    configuration: str,
    checkpoint: str = FINAL_MODEL,
    mirror: bool = True,
    device: str = "auto",
    inference: dict | None = None,
) -> list[Path]:
    """Segment new CT scans with the 5-fold ensemble of a configuration (cascades included:
    the lowres ensemble runs first and its segmentation becomes the extra input channels; a ROI
    configuration predicts only the region that segmentation defines)."""
    from kitsnet.core.device import pick_device
    from kitsnet.core.io import KitsnetError, load_volume
    from kitsnet.preprocess.case import geometry_of, preprocess_image

    dev = pick_device(device)
    inf = {
        "step_size": 0.5,
        "gaussian_sigma_scale": 0.125,
        "tile_batch": 1,
        **(inference or {}),
        "mirror": mirror,
    }

    def ensemble(cfg: str) -> tuple[list[torch.nn.Module], dict]:
        paths = sorted((models_dir / cfg).glob(f"fold_*/{checkpoint}"))
        if not paths:
            raise KitsnetError(f"{models_dir / cfg}: no fold_*/{checkpoint} found")
        return load_models(paths, dev)

    nets, plan = ensemble(configuration)
    prev = ensemble(plan["previous_stage"]) if plan.get("previous_stage") else None
    files = _inputs(input_path)
    if not files:
        raise KitsnetError(f"{input_path}: no .nii.gz images found")
    written = []
    for name, path in files:
        vol = load_volume(path, name)
        image = preprocess_image(np.asarray(vol.array), vol.spacing, plan)
        if prev is None:
            logits = predict_volume(nets, image, plan, inf, dev)
        else:
            prev_nets, prev_plan = prev
            low = preprocess_image(np.asarray(vol.array), vol.spacing, prev_plan)
            seg = logits_to_next_stage(
                predict_volume(prev_nets, low, prev_plan, inf, dev),
                list(image.shape[1:]),
                prev_plan,
                prev_plan["spacing"],
            )
            logits = _second_stage(nets, plan, inf, image, seg, name, dev)
        geometry = geometry_of(vol, name)
        out = Path(out_dir) / f"{name}.nii.gz"
        write_prediction(logits_to_original(logits, geometry, plan), geometry, out)
        written.append(out)
    return written


def _second_stage(nets, plan, inference, image, prev, name, device) -> np.ndarray:
    """A cascade's fullres logits of a new scan from its first-stage labels ``prev``: the
    whole volume (3d_cascade_fullres), or the region the first stage found (a ROI plan:
    cropped, predicted and pasted back as :func:`predict_cropped_case` does)."""
    n = plan["num_classes"]
    if not plan.get("roi"):
        return predict_volume(nets, with_previous_stage(image, prev, n), plan, inference, device)
    boxes, _ = region_boxes(prev, plan["spacing"], plan["roi"], name)
    parts = [
        predict_volume(
            nets,
            with_previous_stage(image[(slice(None), *b.slices)], prev[b.slices], n),
            plan,
            inference,
            device,
        )
        for b in boxes
    ]
    return paste_logits(parts, boxes, image.shape[1:])
