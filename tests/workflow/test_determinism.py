"""Determinism: the same config and seed give byte-identical results on the CPU.

The micro demo is run twice from scratch, in two fresh folders (so absolute paths differ too),
the second time with its batches made by a background worker instead of in the training
process, and its tables compared byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_workflow

COMPARED = ["table1.csv", "table1.md", "scores_per_case.csv", "dataset/splits.json"]


def _training_logs(results: Path) -> dict[str, list[str]]:
    """Every training_log.csv without its wall-clock column."""
    logs = {}
    for path in sorted(results.glob("models/*/fold_*/training_log.csv")):
        rows = [line.split(",") for line in path.read_text().splitlines()]
        drop = rows[0].index("epoch_time_s")
        logs[str(path.relative_to(results))] = [
            ",".join(v for i, v in enumerate(r) if i != drop) for r in rows
        ]
    return logs


@pytest.mark.workflow
def test_the_demo_run_twice_from_scratch_gives_identical_tables(micro_demo, tmp_path):
    # the first run makes batches in process (workers: auto = threads - 1 = 0), this one in a
    # worker process: the seed, not the worker count, decides the batches
    workers = tmp_path / "one_worker.yaml"
    workers.write_text("training:\n  workers: 1\n")
    run_workflow(
        tmp_path,
        "--cores",
        "2",
        "--configfile",
        str(REPO / "tests/data/micro.yaml"),
        str(workers),
    )
    first, second = micro_demo / "results", tmp_path / "results"
    for name in COMPARED:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    logs = _training_logs(first)
    assert len(logs) == 30  # 6 configurations x 5 folds
    assert logs == _training_logs(second)
