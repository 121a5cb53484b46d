"""Adapter: rule ensemble -> kitsnet.predict.ensemble.ensemble_folder, every fold of one pair.

Inputs: ``probabilities`` (results/probabilities/{member}/fold_{k}, both members, all folds)
and ``geometry`` (results/predictions/{A}/fold_{k}: the first member's predictions, whose NIfTI
geometry the ensemble takes), matched to each fold by their folder names.
"""

from pathlib import Path

from kitsnet.core.io import load_json, log_to
from kitsnet.predict.ensemble import ensemble_folder


def _folder(paths, fold: int, member: str | None = None) -> Path:
    """The one input folder of ``fold`` (and ``member``: its parent folder's name)."""
    found = [
        Path(p)
        for p in paths
        if Path(p).name == f"fold_{fold}" and member in (None, Path(p).parent.name)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one input folder for fold {fold} {member or ''}: {found}")
    return found[0]


with log_to(snakemake.log[0]):
    splits = load_json(snakemake.input.splits)
    members = list(snakemake.params.members)
    folds = [int(k) for k in snakemake.params.folds]
    outputs = list(snakemake.output.predictions)
    if len(outputs) != len(folds):
        raise ValueError(f"{len(outputs)} output folders for folds {folds}")
    for fold, out in zip(folds, outputs, strict=True):
        ensemble_folder(
            [_folder(snakemake.input.probabilities, fold, m) for m in members],
            _folder(snakemake.input.geometry, fold),
            splits[fold]["val"],
            out,
        )
