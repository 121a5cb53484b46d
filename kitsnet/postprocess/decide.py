"""The greedy postprocessing decision, as nnU-Net decides it, and the model's full scores.

Score of the decision: the mean over cases of the mean Dice of KiTS21's three regions (kidney =
labels 1-3, masses = 2-3, tumor = 2; both masks empty gives 1, exactly one empty gives 0, as in
:mod:`kitsnet.evaluate.metrics`).  The candidates are tried in
:data:`~kitsnet.postprocess.candidates.CANDIDATES` order, each applied on top of the steps already
accepted; a candidate is accepted when it raises that score strictly (nnU-Net's
``determine_postprocessing`` keeps a step only when its Dice improves, on the output of the steps
kept before it).  The decision runs on the compressed crops of :mod:`kitsnet.postprocess.crops`,
so 300 full-size cases fit in a few GB; cases are loaded and scored in a pool of ``jobs``
processes, each holding one or two full-size volumes at a time.

:func:`postprocess_model` then scores the postprocessed predictions with the six KiTS21 metrics
of :func:`kitsnet.evaluate.metrics.score_arrays` (Dice and Surface Dice per region): the Surface
Dice needs the whole reference, so each case the steps changed is loaded again and postprocessed
with :func:`~kitsnet.postprocess.apply.apply_steps`, the very function prediction uses.  A case
the steps did not change keeps its raw scores, and raw scores are read from the per-fold score
tables when the caller has them (single configurations) or computed here (ensembles, which have
no score table).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kitsnet.core.io import KitsnetError, atomic_path, load_volume, save_json
from kitsnet.evaluate.metrics import METRIC_COLUMNS, score_arrays
from kitsnet.postprocess.apply import apply_steps, apply_to_crop, check_steps
from kitsnet.postprocess.candidates import CANDIDATES, learn_min_volume
from kitsnet.postprocess.crops import CaseCrop, compress, crop_dice, load_case_crop

__all__ = [
    "PER_CASE_COLUMNS",
    "decide_steps",
    "postprocess_model",
    "summarise",
    "write_decision",
    "write_per_case",
]


def _try_step(
    args: tuple[CaseCrop, str | None, float | None],
) -> tuple[list[float], bytes | None]:
    """Dice of one case after ``step`` (``None``: as it is) and the new crop if it changed."""
    crop, step, min_volume_mm3 = args
    pred = crop.pred_array()
    changed = False
    if step is not None and pred.size:
        changed = apply_to_crop(pred, crop.voxel_mm3, [step], min_volume_mm3)
    dice = crop_dice(pred, crop.ref_array(), crop.ref_outside)
    return dice, (compress(pred) if changed else None)


def pool_map(fn: Callable, items: Iterable, pool: ProcessPoolExecutor | None) -> list:
    """``map`` in ``pool`` when there is one, else here (``jobs == 1``: no process overhead)."""
    return list(pool.map(fn, items)) if pool is not None else [fn(item) for item in items]


def _score(dice: list[list[float]]) -> float:
    """Mean over cases of the mean Dice of the three regions."""
    return float(np.mean([np.mean(d) for d in dice])) if dice else float("nan")


def decide_steps(
    crops: list[CaseCrop],
    min_volume_mm3: float | None,
    pool: ProcessPoolExecutor | None = None,
    candidates: Sequence[str] = CANDIDATES,
) -> tuple[list[str], list[dict], list[CaseCrop]]:
    """Greedy decision: ``(accepted steps, one record per candidate, crops after the steps)``.

    A record is ``{"name", "accepted", "score_before", "score_after"}``; ``score_after`` is
    ``None`` for ``kidney_min_volume`` when no minimum volume could be learned (all references
    empty).  The returned crops hold the postprocessed predictions and ``changed`` flags.
    """
    check_steps(candidates, 1.0)  # names only: the threshold is handled below
    raw = pool_map(_try_step, [(c, None, None) for c in crops], pool)
    score = _score([d for d, _ in raw])
    accepted: list[str] = []
    records: list[dict] = []
    for name in candidates:
        if name == "kidney_min_volume" and min_volume_mm3 is None:
            records.append(
                {"name": name, "accepted": False, "score_before": score, "score_after": None}
            )
            continue
        results = pool_map(_try_step, [(c, name, min_volume_mm3) for c in crops], pool)
        after = _score([d for d, _ in results])
        ok = after > score
        records.append({"name": name, "accepted": ok, "score_before": score, "score_after": after})
        if ok:
            accepted.append(name)
            score = after
            crops = [
                c if new is None else replace(c, pred=new, changed=True)
                for c, (_, new) in zip(crops, results, strict=True)
            ]
    return accepted, records, crops


#: Columns of ``results/postprocessing/<model>_per_case.csv``: two rows per case, the raw
#: prediction (``postprocessed`` false) and the postprocessed one (true).
PER_CASE_COLUMNS: list[str] = ["case", "fold", "postprocessed", *METRIC_COLUMNS]

CaseSpec = tuple[int, Path, Path]


def _load_star(item: tuple[str, int, Path, Path]):
    return load_case_crop(*item)


def _full_scores(
    item: tuple[str, Path, Path, list[str], float | None, bool, bool],
) -> tuple[dict | None, dict | None]:
    """Six metrics of one case as it is (if ``need_raw``) and after the steps (if ``changed``).

    At most two full-size volumes live at once besides the scoring's own work (the reference is
    read again rather than held next to the prediction and its postprocessed copy), so a case
    that ``kitsnet evaluate`` can score in its memory can be postprocessed and scored here.
    """
    case, pred_path, ref_path, steps, min_volume_mm3, need_raw, changed = item
    pred = load_volume(pred_path, case)
    raw = pp = None
    try:
        if need_raw:
            raw = score_arrays(pred.array, load_volume(ref_path, case).array, pred.spacing)
        if changed:
            spacing = pred.spacing
            seg = apply_steps(pred.array, spacing, steps, min_volume_mm3)
            del pred
            pp = score_arrays(seg, load_volume(ref_path, case).array, spacing)
    except KitsnetError as exc:
        raise KitsnetError(f"{case}: {pred_path} / {ref_path}: {exc}") from exc
    return raw, pp


def _raw_from_table(raw_scores: pd.DataFrame, cases: list[str], model: str) -> dict[str, dict]:
    """``case -> six metrics`` from the given score table; every case must be there once."""
    missing_cols = [c for c in ["case", *METRIC_COLUMNS] if c not in raw_scores.columns]
    if missing_cols:
        raise KitsnetError(f"{model}: raw score table lacks column(s) {missing_cols}")
    table = raw_scores.astype({"case": str})
    dup = sorted(set(table["case"][table["case"].duplicated()]))
    if dup:
        raise KitsnetError(f"{model}: raw score table lists case(s) more than once: {dup}")
    rows = table.set_index("case")
    missing = [c for c in cases if c not in rows.index]
    if missing:
        raise KitsnetError(f"{model}: raw score table has no row for case(s) {missing}")
    return {c: {m: float(rows.at[c, m]) for m in METRIC_COLUMNS} for c in cases}


def summarise(metrics: pd.DataFrame) -> dict[str, float]:
    """Means of the six columns and ``kits_score``, the mean of those six means."""
    out = {col: float(metrics[col].mean()) for col in METRIC_COLUMNS}
    out["kits_score"] = float(np.mean([out[col] for col in METRIC_COLUMNS]))
    return out


def _pool(jobs: int, n: int) -> contextlib.AbstractContextManager:
    workers = max(1, min(int(jobs), n))
    return ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext()


def _decided_on(n_cases: int, folds: list[int]) -> str:
    return (
        f"out-of-fold predictions of {n_cases} cases (folds {folds}); score: mean over cases of "
        "the mean Dice of kidney, masses and tumor; candidates tried greedily in order, each kept "
        "only if it raises that score"
    )


def postprocess_model(
    model: str,
    configurations: list[str],
    cases: dict[str, CaseSpec],
    raw_scores: pd.DataFrame | None = None,
    jobs: int = 1,
) -> tuple[dict, pd.DataFrame]:
    """Decide the postprocessing of ``model`` and score it: ``(decision, per_case)``.

    ``cases`` maps case -> ``(fold, prediction path, reference path)``; ``raw_scores`` (columns
    ``case`` and :data:`METRIC_COLUMNS`) are the scores of those predictions when known.  The
    decision is the JSON written to ``results/postprocessing/<model>.json`` (keys: model,
    configurations, steps, min_volume_mm3, decided_on, candidates, scores, cases);
    ``per_case`` has :data:`PER_CASE_COLUMNS`, two rows per case (raw, then postprocessed; a
    case the steps did not change has the same scores in both).
    """
    if not cases:
        raise KitsnetError(f"{model}: no cases to decide postprocessing on")
    names = sorted(cases)
    raw = _raw_from_table(raw_scores, names, model) if raw_scores is not None else {}
    items = [(c, int(cases[c][0]), Path(cases[c][1]), Path(cases[c][2])) for c in names]
    with _pool(jobs, len(names)) as pool:
        crops = pool_map(_load_star, items, pool)
        min_volume = learn_min_volume([c.smallest_ref_mm3 for c in crops])
        steps, records, crops = decide_steps(crops, min_volume, pool)
        changed = {c.case: c.changed for c in crops}
        del crops
        todo = [
            (c, p, r, steps, min_volume, c not in raw, changed[c])
            for c, _, p, r in items
            if c not in raw or changed[c]
        ]
        scored = pool_map(_full_scores, todo, pool)
    pp: dict[str, dict] = {}
    for (case, *_), (raw_m, pp_m) in zip(todo, scored, strict=True):
        if raw_m is not None:
            raw[case] = raw_m
        if pp_m is not None:
            pp[case] = pp_m
    rows = []
    for case, fold, _, _ in items:
        rows.append({"case": case, "fold": fold, "postprocessed": False, **raw[case]})
        rows.append({"case": case, "fold": fold, "postprocessed": True, **pp.get(case, raw[case])})
    per_case = pd.DataFrame(rows, columns=PER_CASE_COLUMNS)
    decision = {
        "model": model,
        "configurations": list(configurations),
        "steps": steps,
        "min_volume_mm3": min_volume,
        "decided_on": _decided_on(len(names), sorted({f for _, f, _, _ in items})),
        "candidates": records,
        "scores": {
            "raw": summarise(per_case[~per_case["postprocessed"]]),
            "postprocessed": summarise(per_case[per_case["postprocessed"]]),
        },
        "cases": len(names),
    }
    return decision, per_case


def write_decision(decision: dict, path: str | os.PathLike[str]) -> None:
    """Write the decision JSON atomically (sorted keys, as every kitsnet JSON)."""
    save_json(decision, path)


def write_per_case(per_case: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the per-case table atomically; ``postprocessed`` as ``true``/``false`` like the
    JSON, floats at full (round-trip) precision."""
    out = per_case.copy()
    out["postprocessed"] = out["postprocessed"].map({True: "true", False: "false"})
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, float_format=None)
