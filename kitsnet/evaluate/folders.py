"""Scoring whole folders: pair predictions with references, score in parallel, write the CSV.

This is the file-system side of :mod:`kitsnet.evaluate.metrics` (the per-case definition) and the
home of ``kitsnet evaluate``: the layouts it accepts (flat folders, KiTS21/KiTS23 case folders),
the process pool over cases and the atomic CSV at full float precision.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from kitsnet.core.io import KitsnetError, atomic_path
from kitsnet.evaluate.metrics import METRIC_COLUMNS, score_case

__all__ = [
    "REFERENCE_FILENAME",
    "evaluate_pairs",
    "pair_folder",
    "write_scores",
    "add_cli",
]

#: File name of the reference inside a KiTS21 case folder (official ``GT_SEGM_FNAME``).
REFERENCE_FILENAME = "aggregated_MAJ_seg.nii.gz"

_NII_SUFFIX = ".nii.gz"


def _score_case_star(pair: tuple[str, Path, Path]) -> dict:
    """:func:`score_case` of one tuple: ``ProcessPoolExecutor.map`` passes one argument."""
    return score_case(*pair)


def evaluate_pairs(pairs: list[tuple[str, Path, Path]], jobs: int = 1) -> pd.DataFrame:
    """Score every ``(case, prediction, reference)``; one row per case, sorted by case.

    ``jobs > 1`` spreads cases over a process pool: cases are independent and the work is
    numpy/scipy bound, so processes (not threads) use all cores.
    """
    columns = ["case", *METRIC_COLUMNS]
    if not pairs:
        return pd.DataFrame(columns=columns)
    cases = [case for case, _, _ in pairs]
    duplicates = sorted({c for c in cases if cases.count(c) > 1})
    if duplicates:
        raise KitsnetError(f"case listed more than once: {', '.join(duplicates)}")
    workers = max(1, min(int(jobs), len(pairs)))
    if workers == 1:
        rows = [_score_case_star(pair) for pair in pairs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_score_case_star, pairs))
    df = pd.DataFrame(rows, columns=columns)
    return df.sort_values("case", kind="stable").reset_index(drop=True)


def _case_name(path: Path) -> str | None:
    """``case_00003`` for ``case_00003.nii.gz``; ``None`` for other or hidden (temporary) files."""
    name = path.name
    if name.startswith(".") or not name.endswith(_NII_SUFFIX) or not path.is_file():
        return None
    return name[: -len(_NII_SUFFIX)]


def pair_folder(
    pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str]
) -> list[tuple[str, Path, Path]]:
    """Pair ``pred_dir/<case>.nii.gz`` with its reference, sorted by case.

    The reference is ``ref_dir/<case>.nii.gz`` (flat layout) or, KiTS21 dataset layout,
    ``ref_dir/<case>/aggregated_MAJ_seg.nii.gz`` (KiTS23: ``segmentation.nii.gz``).  Every
    prediction needs a reference.  In the
    flat layout every reference also needs a prediction (the folder is meant to mirror the
    predictions, so a missing prediction is an error, not a silently better mean); a KiTS21
    dataset folder holds all cases, so there only the predictions decide which cases are scored.
    Hidden files (``atomic_path`` temporaries) are ignored.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for label, folder in (("prediction", pred_dir), ("reference", ref_dir)):
        if not folder.is_dir():
            raise KitsnetError(f"{label} folder {folder} does not exist")
    preds = {c: p for p in pred_dir.iterdir() if (c := _case_name(p)) is not None}
    flat_refs = {c: p for p in ref_dir.iterdir() if (c := _case_name(p)) is not None}
    if not preds:
        raise KitsnetError(f"no <case>{_NII_SUFFIX} predictions in {pred_dir}")
    pairs = []
    for case in sorted(preds):
        ref = flat_refs.get(case)
        if ref is None:
            # KiTS21's label file, else KiTS23's
            candidates = [ref_dir / case / n for n in (REFERENCE_FILENAME, "segmentation.nii.gz")]
            ref = next((c for c in candidates if c.is_file()), None)
            if ref is None:
                raise KitsnetError(
                    f"{case}: prediction {preds[case]} has no reference: none of "
                    f"{ref_dir / (case + _NII_SUFFIX)}, {', '.join(map(str, candidates))} exists"
                )
        pairs.append((case, preds[case], ref))
    for case in sorted(set(flat_refs) - set(preds)):
        raise KitsnetError(
            f"{case}: reference {flat_refs[case]} has no prediction: "
            f"{pred_dir / (case + _NII_SUFFIX)} is missing"
        )
    return pairs


def write_scores(df: pd.DataFrame, out_csv: str | os.PathLike[str]) -> None:
    """Write the per-case table atomically, floats at full (round-trip) precision."""
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format=None)


def _format_means(df: pd.DataFrame) -> str:
    """The case count and per-column means, for a person reading the terminal after a run."""
    lines = [f"{len(df)} cases"]
    for col in METRIC_COLUMNS:
        mean = float(df[col].mean()) if len(df) else float("nan")
        lines.append(f"mean {col:12s} {mean:.8f}")
    return "\n".join(lines)


def _run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``kitsnet evaluate``: pair, score, write the CSV, print the means."""
    pairs = pair_folder(args.pred_dir, args.ref_dir)
    df = evaluate_pairs(pairs, jobs=args.jobs)
    write_scores(df, args.out)
    print(_format_means(df))
    print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kitsnet evaluate``; the handler is stored as ``func`` in the parsed args."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against KiTS21 references (Dice, Surface Dice per class)",
        description=(
            "Pair <case>.nii.gz in --pred-dir with --ref-dir/<case>.nii.gz or "
            f"--ref-dir/<case>/{REFERENCE_FILENAME}, write one row per case and print the means."
        ),
    )
    parser.add_argument("--pred-dir", required=True, type=Path, help="folder of predictions")
    parser.add_argument("--ref-dir", required=True, type=Path, help="folder of references")
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: all cores)",
    )
    parser.set_defaults(func=_run_evaluate)
