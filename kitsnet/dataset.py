"""The KiTS21 folder layout: case ids, file names, and up-front validation.

A KiTS21 data root holds one folder per case, ``case_XXXXX/imaging.nii.gz`` and
``case_XXXXX/aggregated_MAJ_seg.nii.gz``.  Case ids are constrained to ``case_\\d{5}`` here and in
the workflow's wildcards, so no id can point outside the data root.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .io import KitsnetError, load_volume

CASE_RE = re.compile(r"case_\d{5}")
IMAGE_NAME = "imaging.nii.gz"
LABEL_NAME = "aggregated_MAJ_seg.nii.gz"
LABELS = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
# Plausible CT: air is about -1000 HU, dense bone/metal a few thousand.  An MR or a 0-1 rescaled
# image falls outside these bounds and would be normalised into nonsense, so we refuse it.
HU_MIN_PLAUSIBLE, HU_MAX_PLAUSIBLE = -1100.0, 5000.0


def check_case_id(case: str) -> str:
    """Return ``case`` if it is a well-formed KiTS21 id, else raise."""
    if not CASE_RE.fullmatch(case):
        raise KitsnetError(f"{case!r}: malformed case id (expected case_ followed by 5 digits)")
    return case


def image_path(root: str | Path, case: str) -> Path:
    return Path(root) / check_case_id(case) / IMAGE_NAME


def label_path(root: str | Path, case: str) -> Path:
    return Path(root) / check_case_id(case) / LABEL_NAME


def list_cases(root: str | Path) -> list[str]:
    """Sorted case ids of a KiTS21-layout folder (folders named ``case_XXXXX``)."""
    root = Path(root)
    if not root.is_dir():
        raise KitsnetError(f"{root}: data root is missing or not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and CASE_RE.fullmatch(p.name))


def validate_case(root: str | Path, case: str) -> list[str]:
    """All problems of one case, one line each (empty list = the case is usable)."""
    problems: list[str] = []
    vols = {}
    for kind, path in (("image", image_path(root, case)), ("label", label_path(root, case))):
        try:
            vols[kind] = load_volume(path, case)
        except KitsnetError as exc:
            problems.append(str(exc))
    img, lab = vols.get("image"), vols.get("label")
    if img is not None:
        path = image_path(root, case)
        if any(not np.isfinite(s) or s <= 0 or s > 20 for s in img.spacing):
            problems.append(f"{case}: {path}: absurd voxel spacing {img.spacing} mm")
        arr = np.asarray(img.array, dtype=np.float32)
        if not np.isfinite(arr).all():
            problems.append(f"{case}: {path}: image contains NaN or inf intensities")
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if lo < HU_MIN_PLAUSIBLE or hi > HU_MAX_PLAUSIBLE or hi - lo < 200:
                problems.append(
                    f"{case}: {path}: intensities [{lo:.1f}, {hi:.1f}] are not plausible CT in HU"
                )
    if lab is not None:
        path = label_path(root, case)
        values = np.unique(np.asarray(lab.array))
        bad = [int(v) for v in values if v not in LABELS]
        if bad:
            problems.append(f"{case}: {path}: label values {bad} outside {{0,1,2,3}}")
        if not np.isin(values, (1, 2, 3)).any():
            problems.append(f"{case}: {path}: no kidney label (1, 2 or 3) in the segmentation")
    if img is not None and lab is not None:
        if img.array.shape != lab.array.shape:
            problems.append(
                f"{case}: {label_path(root, case)}: shape {lab.array.shape} differs from "
                f"image shape {img.array.shape}"
            )
        elif not np.allclose(img.affine, lab.affine, atol=1e-4):
            problems.append(f"{case}: {label_path(root, case)}: affine differs from the image's")
    return problems


def validate_dataset(root: str | Path, cases: list[str] | None = None, folds: int = 5) -> dict:
    """Check every case and return a verdict; raise listing *all* problems if any is found."""
    root = Path(root)
    found = list_cases(root)
    stray = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("case") and not CASE_RE.fullmatch(p.name)
    )
    problems = [f"{name}: {root / name}: malformed case id" for name in stray]
    wanted = found if cases is None else cases
    for case in wanted:
        problems.extend(validate_case(root, case))
    if len(wanted) < folds:
        problems.append(f"{root}: {len(wanted)} cases found, fewer than the {folds} folds")
    if problems:
        raise KitsnetError(
            f"dataset {root} has {len(problems)} problem(s):\n" + "\n".join(problems)
        )
    return {"data_root": str(root), "cases": wanted, "n_cases": len(wanted)}
