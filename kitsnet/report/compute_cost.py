"""The compute-cost table: wall time, peak memory and GPU-hours of every training and
prediction job, from the ``benchmark:`` files Snakemake writes for them.

It reads only those files (explicit paths handed in by the workflow) and writes the table
atomically with fixed formatting, so a rerun on the same inputs gives a byte-identical file.
Rows follow Table 1's configuration order (:func:`kitsnet.report.table1.config_rank`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from kitsnet.core.io import KitsnetError, atomic_path
from kitsnet.report.table1 import config_rank

__all__ = ["COST_COLUMNS", "compute_cost", "write_compute_cost"]

COST_COLUMNS = ["configuration", "fold", "step", "wall_s", "max_rss_mb", "gpus", "gpu_hours"]


def compute_cost(
    benchmarks: Mapping[tuple[str, int, str], Path], gpus: Mapping[tuple[str, str], int]
) -> pd.DataFrame:
    """The compute-cost table: one row per (configuration, fold, step) from Snakemake's
    ``benchmark:`` TSVs, given as ``{(configuration, fold, step): path}``.

    ``wall_s`` is the job's wall time (mean over benchmark repeats), ``max_rss_mb`` its peak
    resident memory (Snakemake's ``max_rss``, MB; empty when the job was too short to sample),
    ``gpus`` the GPUs the job asked for (``gpus[(configuration, step)]``, 0 when absent) and
    ``gpu_hours`` = wall time x GPUs / 3600: what a cluster accounts, whether or not the job used
    the GPU.  A job that was retried is represented by its last attempt.
    """
    rows = []
    for (config, fold, step), path in benchmarks.items():
        path = Path(path)
        rank = config_rank(config, path)
        df = _read_benchmark(path)
        wall = float(df["s"].mean())
        rss = pd.to_numeric(df["max_rss"], errors="coerce").max()
        n_gpu = int(gpus.get((config, step), 0))
        rows.append(
            {
                "configuration": config,
                "fold": int(fold),
                "step": step,
                "wall_s": wall,
                "max_rss_mb": float(rss),
                "gpus": n_gpu,
                "gpu_hours": wall * n_gpu / 3600.0,
                "_rank": (rank, int(fold), step != "train", step),
            }
        )
    if not rows:
        raise KitsnetError("compute_cost: no benchmark files given")
    table = pd.DataFrame(rows).sort_values("_rank", kind="stable").drop(columns="_rank")
    return table[COST_COLUMNS].reset_index(drop=True)


def _read_benchmark(path: Path) -> pd.DataFrame:
    """A Snakemake benchmark TSV with at least its wall time ``s`` and ``max_rss`` columns."""
    if not path.is_file():
        raise KitsnetError(f"{path}: benchmark file is missing")
    try:
        df = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise KitsnetError(f"{path}: unreadable benchmark file ({exc})") from exc
    missing = [c for c in ("s", "max_rss") if c not in df.columns]
    if missing or df.empty:
        raise KitsnetError(f"{path}: benchmark file lacks column(s) {missing or 'rows'}")
    return df


def write_compute_cost(table: pd.DataFrame, out_csv: Path) -> None:
    """Write the compute-cost table with fixed formatting (seconds and MB to 0.01, GPU-h 1e-4)."""
    out = table.copy()
    out["wall_s"] = out["wall_s"].map(lambda v: f"{v:.2f}")
    out["max_rss_mb"] = out["max_rss_mb"].map(lambda v: "" if math.isnan(v) else f"{v:.2f}")
    out["gpu_hours"] = out["gpu_hours"].map(lambda v: f"{v:.4f}")
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False, lineterminator="\n")
