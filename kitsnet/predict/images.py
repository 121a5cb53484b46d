"""Prediction of new CT scans with trained configurations: the fold models of a configuration
averaged (their logits, as nnU-Net v2's predictor averages folds), a cascade's first stage run
first, and the result exported to the scan's own grid as labels and compact probabilities.

Preprocessing is the workflow's own (:func:`kitsnet.preprocess.case.preprocess_image`), so the
labels of a case equal those of the workflow's prediction job for the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kitsnet.core.io import KitsnetError, Volume, load_volume
from kitsnet.predict.infer import (
    Progress,
    class_order,
    export_to_original,
    load_models,
    logits_to_next_stage,
    logits_to_original,
    predict_volume,
    with_previous_stage,
    write_prediction,
)
from kitsnet.predict.probabilities import CompactProbabilities
from kitsnet.preprocess.case import geometry_of, preprocess_image
from kitsnet.preprocess.roi import paste_logits, region_boxes
from kitsnet.stages import FINAL_MODEL

DEFAULT_INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "tile_batch": 1}


@dataclass
class ConfigurationModels:
    """A configuration's fold models (one plan) and, for a cascade, its first stage's."""

    name: str
    networks: list[torch.nn.Module]
    plan: dict
    folds: list[str]
    previous: ConfigurationModels | None = None


def load_configuration(
    models_dir: Path,
    configuration: str,
    folds: list[int] | None = None,
    checkpoint: str = FINAL_MODEL,
    device: torch.device | str = "cpu",
) -> ConfigurationModels:
    """The fold models ``models_dir/<configuration>/fold_<k>/<checkpoint>`` (all folds found,
    or ``folds``), and the first stage's with the same folds for a cascade."""
    base = Path(models_dir) / configuration
    if folds is None:
        paths = sorted(base.glob(f"fold_*/{checkpoint}"))
    else:
        paths = [base / f"fold_{k}" / checkpoint for k in folds]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise KitsnetError(f"{base}: no model {', '.join(missing)}")
    if not paths:
        raise KitsnetError(f"{base}: no fold_*/{checkpoint} found")
    nets, plan = load_models(paths, device)
    prev = None
    if plan.get("previous_stage"):
        prev = load_configuration(models_dir, plan["previous_stage"], folds, checkpoint, device)
    return ConfigurationModels(configuration, nets, plan, [p.parent.name for p in paths], prev)


def scan_logits(
    models: ConfigurationModels,
    vol: Volume,
    name: str,
    inference: dict,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Logits of a configuration on the scan's grid for its plan (a cascade: its first stage's
    labels resampled to that grid become the extra input channels)."""
    plan = models.plan
    image = preprocess_image(np.asarray(vol.array), vol.spacing, plan)
    if models.previous is None:
        return predict_volume(models.networks, image, plan, inference, device, progress)
    prev = models.previous
    low = preprocess_image(np.asarray(vol.array), vol.spacing, prev.plan)
    seg = logits_to_next_stage(
        predict_volume(prev.networks, low, prev.plan, inference, device, progress),
        list(image.shape[1:]),
        prev.plan,
        prev.plan["spacing"],
    )
    return _second_stage(models.networks, plan, inference, image, seg, name, device, progress)


def _second_stage(nets, plan, inference, image, prev, name, device, progress) -> np.ndarray:
    """A cascade's fullres logits of a new scan from its first-stage labels ``prev``: the
    whole volume (3d_cascade_fullres), or the region the first stage found (a ROI plan:
    cropped, predicted and pasted back as :func:`kitsnet.predict.infer.predict_cropped_case`
    does)."""
    n = plan["num_classes"]
    if not plan.get("roi"):
        image = with_previous_stage(image, prev, n)
        return predict_volume(nets, image, plan, inference, device, progress)
    boxes, _ = region_boxes(prev, plan["spacing"], plan["roi"], name)
    parts = [
        predict_volume(
            nets,
            with_previous_stage(image[(slice(None), *b.slices)], prev[b.slices], n),
            plan,
            inference,
            device,
            progress,
        )
        for b in boxes
    ]
    return paste_logits(parts, boxes, image.shape[1:], class_order(plan) is not None)


def scan_prediction(
    models: ConfigurationModels,
    vol: Volume,
    name: str,
    inference: dict,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[np.ndarray, CompactProbabilities]:
    """Labels and compact probabilities of one configuration on the scan's own grid."""
    logits = scan_logits(models, vol, name, inference, device, progress)
    return export_to_original(logits, geometry_of(vol, name), models.plan)


def scan_inputs(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs: a single .nii.gz, a folder of them, or a KiTS21-layout folder."""
    if path.is_file():
        name = path.name.removesuffix(".nii.gz")
        return [(path.parent.name if name == "imaging" else name, path)]
    kits = sorted(path.glob("case_*/imaging.nii.gz"))
    if kits:
        return [(p.parent.name, p) for p in kits]
    files = [(p.name.removesuffix(".nii.gz"), p) for p in sorted(path.glob("*.nii.gz"))]
    if not files:
        raise KitsnetError(f"{path}: no .nii.gz images found")
    return files


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
    """Segment new CT scans with the fold ensemble of one configuration (cascades included:
    the first stage runs first; a ROI configuration predicts only the region it found)."""
    from kitsnet.core.device import pick_device

    dev = pick_device(device)
    inf = {**DEFAULT_INFERENCE, **(inference or {}), "mirror": mirror}
    models = load_configuration(Path(models_dir), configuration, None, checkpoint, dev)
    written = []
    for name, path in scan_inputs(Path(input_path)):
        vol = load_volume(path, name)
        logits = scan_logits(models, vol, name, inf, dev)
        geometry = geometry_of(vol, name)
        out = Path(out_dir) / f"{name}.nii.gz"
        write_prediction(logits_to_original(logits, geometry, models.plan), geometry, out)
        written.append(out)
    return written
