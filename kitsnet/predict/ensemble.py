"""Ensembles of configurations from their compact probabilities (nnU-Net's ensembling).

Why: nnU-Net's ``nnUNetv2_ensemble`` averages the members' softmax probabilities on the
original grid and takes the arg-max (region-based members: their sigmoids, then each region
above 0.5; a mix of both averages regions, :mod:`kitsnet.predict.averaging`); model
selection scores every two-configuration ensemble that way on the out-of-fold cases.  Here
the members' probabilities are the compact files the prediction jobs write
(:mod:`kitsnet.predict.probabilities`), and the ensemble's label map gets exactly the geometry
(affine, zooms, sform/qform codes) of the first member's prediction, which is the input
image's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsnet.core.io import KitsnetError, save_volume
from kitsnet.core.regions import REGIONS
from kitsnet.predict.averaging import ensemble_labels
from kitsnet.predict.probabilities import (
    CLASSES,
    REGIONS_KIND,
    CompactProbabilities,
    load_probabilities,
)
from kitsnet.stages import NUM_CLASSES

__all__ = ["ensemble_case", "ensemble_folder"]

PathLike = str | os.PathLike[str]


def _geometry(path: Path, case: str) -> nib.Nifti1Image:
    """The first member's prediction, header only (its voxels are not read)."""
    if not path.is_file():
        raise KitsnetError(f"{case}: {path}: prediction (the ensemble's geometry) is missing")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise KitsnetError(
            f"{case}: {path}: unreadable NIfTI ({type(exc).__name__}: {exc})"
        ) from exc


def _compatible(a: CompactProbabilities, b: CompactProbabilities) -> bool:
    """Whether two members can be averaged: the same kind and channels, or KiTS's classes
    (background, kidney, tumor, cyst) beside its regions (kidney, masses, tumor)."""
    if (a.kind, a.n_classes) == (b.kind, b.n_classes):
        return True
    expected = {CLASSES: NUM_CLASSES, REGIONS_KIND: len(REGIONS)}
    return all(m.n_classes == expected.get(m.kind) for m in (a, b))


def ensemble_case(
    case: str, prob_paths: list[PathLike], geometry_path: PathLike, out_path: PathLike
) -> None:
    """Write ``out_path``: the arg-max of the mean of the members' compact probabilities, with
    the affine and header geometry of ``geometry_path``; KitsnetError naming the case and the
    file when a member is missing, damaged or on another grid."""
    ref = _geometry(Path(geometry_path), case)
    shape = tuple(int(s) for s in ref.header.get_data_shape())
    members = []
    for path in prob_paths:
        cp = load_probabilities(path, case)
        if tuple(cp.shape) != shape:
            raise KitsnetError(
                f"{case}: {path}: probabilities on a grid of {list(cp.shape)}, but the "
                f"prediction {geometry_path} has {list(shape)}"
            )
        first = members[0] if members else cp
        if not _compatible(cp, first):
            raise KitsnetError(
                f"{case}: {path}: {cp.n_classes} {cp.kind}, but {prob_paths[0]} has "
                f"{first.n_classes} {first.kind}"
            )
        members.append(cp)
    seg = ensemble_labels(members)
    header = ref.header
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    save_volume(seg.astype(np.uint8), out_path, ref.affine, header=header, spacing=zooms)


def ensemble_folder(
    prob_dirs: list[PathLike],
    geometry_dir: PathLike,
    cases: list[str],
    out_dir: PathLike,
    log: Callable[[str], None] = print,
) -> None:
    """``out_dir/{case}.nii.gz`` for every case: the ensemble of ``prob_dirs[i]/{case}.npz``,
    on the grid and geometry of ``geometry_dir/{case}.nii.gz`` (the first member's prediction).

    Every member file is checked to exist before any case is computed, so a missing one fails
    the job at once, naming the case and the file."""
    prob_dirs = [Path(d) for d in prob_dirs]
    missing = [
        f"{case}: {d / f'{case}.npz'}: probabilities missing"
        for case in cases
        for d in prob_dirs
        if not (d / f"{case}.npz").is_file()
    ]
    if missing:
        raise KitsnetError(
            f"ensemble of {len(prob_dirs)} members: {len(missing)} probability files "
            "missing:\n" + "\n".join(missing)
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        ensemble_case(
            case,
            [d / f"{case}.npz" for d in prob_dirs],
            Path(geometry_dir) / f"{case}.nii.gz",
            out_dir / f"{case}.nii.gz",
        )
        log(f"ensemble {i + 1}/{len(cases)}: {case} -> {out_dir / f'{case}.nii.gz'}")
