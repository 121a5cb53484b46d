"""kitsnet.report.compute_cost: the compute-cost table from Snakemake's benchmark files."""

from __future__ import annotations

import math

import pytest

from kitsnet.core.io import KitsnetError
from kitsnet.report.compute_cost import COST_COLUMNS, compute_cost, write_compute_cost

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, seconds, rss="512.50"):
    path.write_text(HEADER + f"{seconds}\t0:00:00\t{rss}\t1.0\t1.0\t1.0\t0.0\t0.0\t50.0\t1.0\n")
    return path


def test_rows_in_paper_order_with_gpu_hours(tmp_path):
    files = {
        ("3d_cascade_fullres", 0, "predict"): _bench(tmp_path / "a.tsv", 36.0),
        ("3d_cascade_fullres", 0, "train"): _bench(tmp_path / "b.tsv", 7200.0, "2048.0"),
        ("2d", 1, "train"): _bench(tmp_path / "c.tsv", 1800.0),
        ("2d", 0, "train"): _bench(tmp_path / "d.tsv", 3600.0, "NA"),
    }
    gpus = {("2d", "train"): 1, ("3d_cascade_fullres", "train"): 2}
    table = compute_cost(files, gpus)
    assert list(table.columns) == COST_COLUMNS
    keys = list(zip(table["configuration"], table["fold"], table["step"], strict=True))
    assert keys == [
        ("2d", 0, "train"),
        ("2d", 1, "train"),
        ("3d_cascade_fullres", 0, "train"),
        ("3d_cascade_fullres", 0, "predict"),
    ]
    assert list(table["gpu_hours"]) == [1.0, 0.5, 4.0, 0.0]  # predict: no GPUs given
    assert math.isnan(table["max_rss_mb"][0]) and table["max_rss_mb"][2] == 2048.0
    out = tmp_path / "cost.csv"
    write_compute_cost(table, out)
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(COST_COLUMNS)
    assert lines[1] == "2d,0,train,3600.00,,1,1.0000"
    assert lines[3] == "3d_cascade_fullres,0,train,7200.00,2048.00,2,4.0000"


def test_bad_benchmark_files_are_named(tmp_path):
    with pytest.raises(KitsnetError, match="missing"):
        compute_cost({("2d", 0, "train"): tmp_path / "nope.tsv"}, {})
    (tmp_path / "bad.tsv").write_text("x\ty\n1\t2\n")
    with pytest.raises(KitsnetError, match="lacks"):
        compute_cost({("2d", 0, "train"): tmp_path / "bad.tsv"}, {})
    with pytest.raises(KitsnetError, match="unknown configuration"):
        compute_cost({("3d", 0, "train"): _bench(tmp_path / "ok.tsv", 1.0)}, {})
    with pytest.raises(KitsnetError, match="no benchmark"):
        compute_cost({}, {})
