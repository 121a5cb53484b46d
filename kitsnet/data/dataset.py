"""The KiTS folder layouts: case ids, file names, and up-front validation.

A KiTS21 data root holds one folder per case, ``case_XXXXX/imaging.nii.gz`` and
``case_XXXXX/aggregated_MAJ_seg.nii.gz``; a KiTS23 data root (its ``dataset/`` folder) the same
with ``segmentation.nii.gz`` (the same labels; its cases 0-299 are KiTS21's patients).  The
``dataset`` setting (or :func:`detect_dataset`) says which.  Case ids are constrained to
``case_\\d{5}`` here and in the workflow's wildcards, so no id can point outside the data root.

Validation comes in two layers, both reporting *every* problem, one line each, in the form
``case_XXXXX: path: what is wrong``:

* :func:`check_layout` only looks at names and ``stat``: malformed or duplicate case ids, a case
  that is not a folder, missing files, fewer cases than folds.  It is cheap enough for the
  workflow to run while it parses, so such a dataset stops it before any job.
* :func:`validate_dataset` adds :func:`validate_case`, which reads every volume: unreadable or
  truncated files, not 3D, shapes/affines that disagree, non-positive or absurd spacing, NaN/inf,
  intensities that are not CT in HU, label values outside {0,1,2,3}, no kidney label.

Nothing here writes anything.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsnet.core.io import KitsnetError, load_volume

CASE_RE = re.compile(r"case_\d{5}")
# Anything that looks like it was meant to be a case id: case_1, Case_00001, CASE-00001,
# case_000001...  Such names are reported (malformed, and duplicate when their number is
# also a well-formed case) instead of being silently skipped.
CASE_LIKE_RE = re.compile(r"case\W*_?\W*0*(\d+)\D*", re.IGNORECASE)
IMAGE_NAME = "imaging.nii.gz"
# the reference segmentation of each layout (the synthetic demo writes KiTS21's)
LABEL_NAMES = {
    "kits21": "aggregated_MAJ_seg.nii.gz",
    "kits23": "segmentation.nii.gz",
    "synthetic": "aggregated_MAJ_seg.nii.gz",
}
LABEL_NAME = LABEL_NAMES["kits21"]
LABELS = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
# Plausible CT in Hounsfield units: air (about -1000 HU) surrounds every abdominal scan, so the
# darkest voxel must be air-like; scanners pad outside the field of view with down to -3024, and
# nothing in HU exceeds the int16 range.  An MR, a 0-1 rescaled image or raw scanner values
# without the rescale intercept (minimum ~0) fall outside and would be normalised into nonsense.
HU_AIR_MAX = -500.0
HU_MIN_PLAUSIBLE, HU_MAX_PLAUSIBLE = -4000.0, 32767.0
# KiTS21 spacings are 0.44-1.04 mm in-plane and 0.5-5 mm between slices
SPACING_MIN_MM, SPACING_MAX_MM = 0.05, 20.0


def check_case_id(case: str) -> str:
    """Return ``case`` if it is a well-formed KiTS21 id, else raise."""
    if not isinstance(case, str) or not CASE_RE.fullmatch(case):
        raise KitsnetError(f"{case!r}: malformed case id (expected case_ followed by 5 digits)")
    return case


def image_path(root: str | Path, case: str) -> Path:
    return Path(root) / check_case_id(case) / IMAGE_NAME


def label_path(root: str | Path, case: str, label_name: str = LABEL_NAME) -> Path:
    return Path(root) / check_case_id(case) / label_name


def label_name_of(dataset: str) -> str:
    """The label file name of a ``dataset`` setting (kits21, kits23, synthetic)."""
    if dataset not in LABEL_NAMES:
        raise KitsnetError(f"dataset: {dataset!r} is not one of {sorted(LABEL_NAMES)}")
    return LABEL_NAMES[dataset]


def detect_dataset(root: str | Path) -> str:
    """kits23 when the case folders hold ``segmentation.nii.gz`` and none KiTS21's label file,
    else kits21 (whose problems the validation then names)."""
    folders = [Path(root) / c for c in list_cases(root)]
    kits21 = any((f / LABEL_NAMES["kits21"]).exists() for f in folders)
    kits23 = any((f / LABEL_NAMES["kits23"]).exists() for f in folders)
    return "kits23" if kits23 and not kits21 else "kits21"


def list_cases(root: str | Path) -> list[str]:
    """Sorted case ids of a KiTS21-layout folder (folders named ``case_XXXXX``)."""
    root = Path(root)
    if not root.is_dir():
        raise KitsnetError(f"{root}: data root is missing or not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and CASE_RE.fullmatch(p.name))


def check_layout(
    root: str | Path,
    cases: list[str] | None = None,
    folds: int | None = None,
    label_name: str = LABEL_NAME,
) -> list[str]:
    """Problems visible from names and ``stat`` alone, one line each (reads no volume).

    ``cases``: the ids the caller expects (default: every ``case_XXXXX`` folder found).
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: data root is missing or not a folder"]
    problems: list[str] = []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    wellformed = {p.name for p in entries if CASE_RE.fullmatch(p.name)}
    numbers = {int(name[5:]): name for name in wellformed}
    seen_numbers: dict[int, str] = {}
    for p in entries:
        name = p.name
        if CASE_RE.fullmatch(name):
            if not p.is_dir():
                problems.append(f"{name}: {p}: is not a folder")
            continue
        m = CASE_LIKE_RE.fullmatch(name)
        if not m and not (p.is_dir() and name.lower().startswith("case")):
            continue  # README, LICENSE, kits.json... are not cases
        what = "malformed case id (expected case_ followed by 5 digits)"
        if m:
            n = int(m.group(1))
            twin = numbers.get(n) or seen_numbers.get(n)
            if twin:
                what += f"; duplicate of {twin}"
            seen_numbers.setdefault(n, name)
        problems.append(f"{name}: {p}: {what}")
    wanted = sorted(wellformed) if cases is None else list(cases)
    dupes = sorted({c for c in wanted if wanted.count(c) > 1})
    problems += [f"{c}: {root / str(c)}: case id listed more than once" for c in dupes]
    for case in dict.fromkeys(wanted):
        if not isinstance(case, str) or not CASE_RE.fullmatch(case):
            problems.append(
                f"{case}: {root}: malformed case id (expected case_ followed by 5 digits)"
            )
            continue
        folder = root / case
        if not folder.exists():
            problems.append(f"{case}: {folder}: case folder is missing")
            continue
        if not folder.is_dir():
            if case not in wellformed:
                problems.append(f"{case}: {folder}: is not a folder")
            continue
        for path in (folder / IMAGE_NAME, folder / label_name):
            if not path.exists():
                problems.append(f"{case}: {path}: file is missing")
            elif not path.is_file():
                problems.append(f"{case}: {path}: is not a file")
    if folds is not None and len(set(wanted)) < folds:
        problems.append(
            f"{root}: {len(set(wanted))} cases found, fewer than the {folds} folds "
            "(every fold needs at least one validation case)"
        )
    return problems


def _raw_pixdim(path: Path) -> tuple[float, float, float] | None:
    """The spacing exactly as stored (nibabel silently replaces 0 by 1 and takes abs())."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
        return tuple(float(z) for z in hdr["pixdim"][1:4])
    except Exception:
        return None


def validate_case(root: str | Path, case: str, label_name: str = LABEL_NAME) -> list[str]:
    """All problems of one case, one line each (empty list = the case is usable)."""
    problems: list[str] = []
    vols = {}
    paths = {"image": image_path(root, case), "label": label_path(root, case, label_name)}
    for kind, path in paths.items():
        try:
            vols[kind] = load_volume(path, case, verify=True)
        except KitsnetError as exc:
            problems.append(str(exc))
    for kind, vol in vols.items():
        path = paths[kind]
        raw = _raw_pixdim(path) or vol.spacing
        column_norms = np.linalg.norm(vol.affine[:3, :3], axis=0)
        if any(not np.isfinite(s) or s <= 0 for s in raw):
            problems.append(f"{case}: {path}: non-positive or undefined voxel spacing {raw} mm")
        elif any(s < SPACING_MIN_MM or s > SPACING_MAX_MM for s in raw):
            problems.append(
                f"{case}: {path}: absurd voxel spacing {raw} mm "
                f"(expected {SPACING_MIN_MM}-{SPACING_MAX_MM} mm)"
            )
        elif not np.isfinite(vol.affine).all() or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
            problems.append(f"{case}: {path}: affine is singular or not finite")
        elif not np.allclose(column_norms, vol.spacing, rtol=1e-3, atol=1e-4):
            problems.append(
                f"{case}: {path}: header spacing {vol.spacing} mm disagrees with the affine's "
                f"{tuple(round(float(s), 4) for s in column_norms)} mm"
            )
    img, lab = vols.get("image"), vols.get("label")
    if img is not None:
        path = paths["image"]
        arr = img.array
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            problems.append(f"{case}: {path}: image contains {n_bad} NaN or inf intensities")
        elif arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            if lo < HU_MIN_PLAUSIBLE or lo > HU_AIR_MAX or hi > HU_MAX_PLAUSIBLE or hi - lo < 200:
                problems.append(
                    f"{case}: {path}: intensities [{lo:.1f}, {hi:.1f}] are not plausible CT in "
                    f"HU (expected air near -1000 HU, all values within "
                    f"[{HU_MIN_PLAUSIBLE:.0f}, {HU_MAX_PLAUSIBLE:.0f}])"
                )
    if lab is not None:
        path = paths["label"]
        values = np.unique(np.asarray(lab.array))
        bad = [v.item() for v in values if not (float(v).is_integer() and int(v) in LABELS)]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
            problems.append(f"{case}: {path}: label values [{shown}] outside {{0,1,2,3}}")
        if not np.isin(values, (1, 2, 3)).any():
            problems.append(f"{case}: {path}: no kidney label (1, 2 or 3) in the segmentation")
    if img is not None and lab is not None:
        if img.array.shape != lab.array.shape:
            problems.append(
                f"{case}: {paths['label']}: shape {lab.array.shape} differs from "
                f"image shape {img.array.shape}"
            )
        elif not np.allclose(img.affine, lab.affine, atol=1e-4):
            problems.append(f"{case}: {paths['label']}: affine differs from the image's")
    return problems


def validate_dataset(
    root: str | Path, cases: list[str] | None = None, folds: int = 5, dataset: str = "auto"
) -> dict:
    """Check every case and return a verdict; raise listing *all* problems if any is found.

    ``dataset``: kits21, kits23 (which label file each case has) or auto (:func:`detect_dataset`).
    """
    root = Path(root)
    if not root.is_dir():
        raise KitsnetError(f"{root}: data root is missing or not a folder")
    dataset = detect_dataset(root) if dataset == "auto" else dataset
    label_name = label_name_of(dataset)
    problems = check_layout(root, cases, folds, label_name)
    wanted = list_cases(root) if cases is None else list(dict.fromkeys(cases))
    for case in wanted:
        if CASE_RE.fullmatch(str(case)) and (root / case).is_dir():
            problems.extend(validate_case(root, case, label_name))
    problems = list(dict.fromkeys(problems))  # a missing file is seen by both layers
    if problems:
        raise KitsnetError(
            f"dataset {root} has {len(problems)} problem(s):\n" + "\n".join(problems)
        )
    return {"data_root": str(root), "dataset": dataset, "cases": wanted, "n_cases": len(wanted)}


# The annotators' aggregations KiTS21 ships beside each case's imaging: majority vote (the
# reference), intersection and union.  Tests and benchmarks on real geometry read them through
# one setting, the environment variable below, so that nothing reads a folder outside a clone.
AGGREGATIONS = ("MAJ", "AND", "OR")
LABEL_MAPS_ENV = "KITSNET_KITS21_LABELS"


def aggregated_label_maps(root: str | Path) -> dict[str, dict[str, Path]]:
    """``case -> {"MAJ": path, "AND": path, "OR": path}`` (those present) under ``root``.

    Two layouts, because KiTS21's label maps are in git while its imaging is not, so they travel
    without it: a KiTS21 clone's data folder (``case_XXXXX/aggregated_MAJ_seg.nii.gz``, ``_AND_``,
    ``_OR_``: what the README's ``git clone`` makes) and a flat folder of
    ``case_XXXXX_MAJ.nii.gz``, ``case_XXXXX_AND.nii.gz``, ``case_XXXXX_OR.nii.gz``.
    """
    root = Path(root)
    if not root.is_dir():
        raise KitsnetError(f"{root}: KiTS21 label maps folder is missing or not a folder")
    maps: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        for agg in AGGREGATIONS:
            nested = path / f"aggregated_{agg}_seg.nii.gz"
            if CASE_RE.fullmatch(path.name) and nested.is_file():
                maps.setdefault(path.name, {})[agg] = nested
            case = path.name.removesuffix(f"_{agg}.nii.gz")
            if case != path.name and CASE_RE.fullmatch(case) and path.is_file():
                maps.setdefault(case, {})[agg] = path
    return maps


def label_maps_from_env() -> tuple[dict[str, dict[str, Path]], str]:
    """The label maps that ``$KITSNET_KITS21_LABELS`` points at, and why there are none ("" when
    there are), for tests and benchmarks to skip with a reason that says how to enable them."""
    how = (
        f"set {LABEL_MAPS_ENV} to a KiTS21 clone's label maps to run it (kits21/kits21/data after "
        "`git clone https://github.com/neheller/kits21`, or a folder of "
        "case_XXXXX_{MAJ,AND,OR}.nii.gz)"
    )
    setting = os.environ.get(LABEL_MAPS_ENV, "")
    if not setting:
        return {}, f"needs real KiTS21 label maps: {how}"
    root = Path(setting).expanduser().resolve()
    if not root.is_dir():
        return {}, f"{LABEL_MAPS_ENV}={setting} is not a folder: {how}"
    maps = aggregated_label_maps(root)
    if not maps:
        return {}, f"{LABEL_MAPS_ENV}={setting} holds no KiTS21 label maps: {how}"
    return maps, ""
