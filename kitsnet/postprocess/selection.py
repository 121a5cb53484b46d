"""Model selection after cross-validation: every configuration and every two-configuration
ensemble, with and without its postprocessing, ranked by the mean of the six KiTS21 scores.

This is what nnU-Net's ``find_best_configuration`` does after the folds are trained, on the
postprocessing decisions of :mod:`kitsnet.postprocess.decide` (one JSON per model).  The best
model's record, ``best_configuration.json``, holds everything prediction needs to reproduce
it: the configurations (averaged as an ensemble when there are two), the folds and the
postprocessing steps; ``kitsnet predict`` follows it by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kitsnet.core.io import KitsnetError, atomic_path, load_json, save_json
from kitsnet.evaluate.metrics import METRIC_COLUMNS

SELECTION_COLUMNS = ["model", "postprocessed", *METRIC_COLUMNS, "kits_score"]
SELECTED_BY = "kits_score: mean of the six KiTS21 Dice / Surface Dice columns (out-of-fold)"
FORMAT = "kitsnet-best-configuration/1"


def _scores(decision: dict, which: str, path: Path) -> dict[str, float]:
    """The six columns and their mean for ``which`` ('raw' or 'postprocessed') of a decision."""
    try:
        block = decision["scores"][which]
        values = {c: float(block[c]) for c in METRIC_COLUMNS}
    except (KeyError, TypeError, ValueError) as err:
        raise KitsnetError(f"{path}: no '{which}' scores with {METRIC_COLUMNS} ({err})") from err
    values["kits_score"] = sum(values.values()) / len(METRIC_COLUMNS)
    return values


def collate(decisions: dict[str, Path]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """``model -> postprocessing JSON`` -> the selection table (two rows per model, in the given
    order: without, then with its postprocessing) and the decisions read."""
    rows, read = [], {}
    for model, path in decisions.items():
        decision = load_json(path)
        if decision.get("model") != model:
            raise KitsnetError(f"{path}: holds model {decision.get('model')!r}, not {model!r}")
        read[model] = decision
        for postprocessed in (False, True):
            scores = _scores(decision, "postprocessed" if postprocessed else "raw", Path(path))
            rows.append({"model": model, "postprocessed": postprocessed, **scores})
    return pd.DataFrame(rows, columns=SELECTION_COLUMNS), read


#: The sliding-window settings prediction must repeat to reproduce the workflow's labels (the
#: tile batch too: batched convolutions round differently).
INFERENCE_KEYS = ("step_size", "gaussian_sigma_scale", "mirror", "tile_batch")


def best_of(
    table: pd.DataFrame,
    decisions: dict[str, dict],
    folds: Sequence[int],
    inference: dict | None = None,
) -> dict:
    """The arg-max of ``kits_score`` (the first row on ties: a single configuration before an
    ensemble, no postprocessing before postprocessing, the simpler model) as the record that
    prediction follows, with the workflow's ``inference`` settings."""
    scores = table["kits_score"].to_numpy(dtype=float)
    if not len(scores) or all(math.isnan(s) for s in scores):
        raise KitsnetError("model selection: no model has a kits_score")
    row = table.iloc[int(pd.Series(scores).idxmax())]
    decision = decisions[row["model"]]
    postprocessed = bool(row["postprocessed"])
    steps = list(decision.get("steps", [])) if postprocessed else []
    return {
        "format": FORMAT,
        "model": row["model"],
        "configurations": list(decision["configurations"]),
        "ensemble": len(decision["configurations"]) > 1,
        "folds": [int(f) for f in folds],
        "postprocessed": postprocessed,
        "postprocessing": {
            "steps": steps,
            "min_volume_mm3": decision.get("min_volume_mm3") if steps else None,
        },
        "scores": {c: float(row[c]) for c in [*METRIC_COLUMNS, "kits_score"]},
        "selected_by": SELECTED_BY,
        "inference": {k: v for k, v in (inference or {}).items() if k in INFERENCE_KEYS},
    }


def write_selection(
    decisions: dict[str, Path],
    folds: Sequence[int],
    csv_out: Path,
    best_out: Path,
    inference: dict | None = None,
) -> dict:
    """Collate the decisions, write ``model_selection.csv`` and ``best_configuration.json``."""
    table, read = collate(decisions)
    best = best_of(table, read, folds, inference)
    out = table.copy()
    out["postprocessed"] = out["postprocessed"].map(lambda b: "true" if b else "false")
    with atomic_path(csv_out) as tmp:
        out.to_csv(tmp, index=False, float_format="%.6f", lineterminator="\n")
    save_json(best, best_out)
    return best


def read_best(path: Path) -> dict:
    """``best_configuration.json`` as prediction needs it, with a clear error if it is not one."""
    if not Path(path).is_file():
        raise KitsnetError(
            f"{path}: not found; run the workflow to the end (results/best_configuration.json) "
            "or name the model with --model"
        )
    best = load_json(path)
    missing = {"model", "configurations", "postprocessing"} - set(best)
    if missing:
        raise KitsnetError(f"{path}: not a best_configuration.json (missing {sorted(missing)})")
    return best
