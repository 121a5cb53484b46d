"""kitsnet.report.stats and the statistics of Table 1: each number checked against an independent
computation on a small fixed table (plain-Python loops, an exact Wilcoxon distribution by
enumeration), and table1_stats.csv / table1.md / Figure 3 written from a synthetic per-case
table with five configurations including 3d_cascade_roi."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kitsnet.report.figures import plot_per_case
from kitsnet.report.stats import (
    STATS_COLUMNS,
    StatsSettings,
    bootstrap_ci,
    bootstrap_means,
    fold_sd,
    paper_in_ci,
    table1_stats,
    wilcoxon_p,
)
from kitsnet.report.table1 import (
    CONFIG_ORDER,
    METRIC_COLUMNS,
    PAPER_TABLE1,
    collate,
    order_configs,
    paper_values,
    write_table,
)

# Eleven cases, distinct values, of one configuration and one metric.
VALUES = [0.91, 0.42, 0.77, 0.99, 0.63, 0.85, 0.12, 0.58, 0.96, 0.71, 0.34]


def _loop_percentile(sorted_means: list[float], q: float) -> float:
    """The 'linear' percentile (numpy's default, Hyndman & Fan type 7), written out."""
    h = (len(sorted_means) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_means) - 1)
    return sorted_means[lo] + (h - lo) * (sorted_means[hi] - sorted_means[lo])


def _loop_bootstrap_ci(values, seed, n_resamples, level):
    """The documented scheme with plain Python: one index matrix from
    default_rng(seed).integers(0, n, size=(n_resamples, n)), a loop over its rows summing the
    chosen values, the sorted means and the type-7 percentiles."""
    n = len(values)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n)).tolist()
    means = sorted(sum(values[i] for i in row) / n for row in idx)
    tail = 100.0 * (1.0 - level) / 2.0
    return _loop_percentile(means, tail), _loop_percentile(means, 100.0 - tail)


def test_bootstrap_ci_equals_a_plain_loop_over_the_documented_resamples():
    for seed, n_resamples, level in ((0, 2000, 0.95), (12345, 501, 0.9)):
        got = bootstrap_ci(np.array(VALUES), seed, n_resamples, level)
        want = _loop_bootstrap_ci(VALUES, seed, n_resamples, level)
        assert got == pytest.approx(want, abs=1e-12)


def test_bootstrap_is_reproducible_with_its_seed_and_brackets_the_mean():
    a = bootstrap_means(np.array(VALUES), 10_000, seed=7)
    assert np.array_equal(a, bootstrap_means(np.array(VALUES), 10_000, seed=7))
    assert not np.array_equal(a, bootstrap_means(np.array(VALUES), 10_000, seed=8))
    low, high = bootstrap_ci(np.array(VALUES), seed=7)  # 10,000 resamples by default
    assert low < statistics.fmean(VALUES) < high
    assert bootstrap_ci(np.full(5, 0.5), seed=0) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([]), seed=0))


def _exact_wilcoxon_p(diffs: list[float]) -> float:
    """Two-sided exact p of the signed-rank test by enumerating all 2^n sign assignments
    (no ties, no zeros): 2 * min(P(W+ <= w), P(W+ >= w)), at most 1."""
    ranks = {d: r for r, d in enumerate(sorted(diffs, key=abs), start=1)}
    w = sum(ranks[d] for d in diffs if d > 0)
    rank_list = list(ranks.values())
    totals = [
        sum(r for r, s in zip(rank_list, signs, strict=True) if s)
        for signs in itertools.product((False, True), repeat=len(rank_list))
    ]
    below = sum(t <= w for t in totals) / len(totals)
    above = sum(t >= w for t in totals) / len(totals)
    return min(1.0, 2 * min(below, above))


def test_wilcoxon_p_equals_the_exact_enumeration_paired_on_case_id():
    cases = [f"case_{i:05d}" for i in range(11)]
    ref = pd.Series(VALUES, index=cases)
    shifts = [0.03, -0.011, 0.052, 0.004, 0.027, -0.008, 0.061, 0.019, -0.002, 0.045, 0.036]
    scores = pd.Series([v + s for v, s in zip(VALUES, shifts, strict=True)], index=cases)
    diffs = [round(s, 10) for s in shifts]
    # paired on the index, not the position: reversing one side changes nothing
    got = wilcoxon_p(scores.iloc[::-1], ref)
    assert got == pytest.approx(_exact_wilcoxon_p(diffs), rel=1e-9)
    assert 0.0 < got < 0.05  # mostly positive shifts


def test_wilcoxon_p_drops_unpaired_and_nan_cases_and_is_one_when_all_equal():
    cases = [f"case_{i:05d}" for i in range(8)]
    ref = pd.Series(VALUES[:8], index=cases)
    shifts = [0.02, -0.05, 0.07, 0.011, -0.03, 0.09, 0.04, -0.013]
    scores = pd.Series([v + s for v, s in zip(VALUES[:8], shifts, strict=True)], index=cases)
    with_noise = pd.concat([scores, pd.Series([0.5], index=["case_00099"])])  # no partner
    with_noise.iloc[2] = np.nan  # case_00002 dropped on this side
    keep = [s for i, s in enumerate(shifts) if i != 2]
    assert wilcoxon_p(with_noise, ref) == pytest.approx(_exact_wilcoxon_p(keep), rel=1e-9)
    assert wilcoxon_p(ref.copy(), ref) == 1.0
    assert math.isnan(wilcoxon_p(pd.Series(dtype=float), ref))


def test_fold_sd_is_the_sample_sd_of_the_fold_means():
    values = pd.Series([1.0, 0.8, 0.9, 0.5, 0.7, np.nan])
    folds = pd.Series([0, 0, 1, 1, 2, 2])
    fold_means = [0.9, 0.7, 0.7]  # fold 2's NaN is skipped, as in Table 1's mean
    assert fold_sd(values, folds) == pytest.approx(statistics.stdev(fold_means))  # ddof=1
    assert math.isnan(fold_sd(pd.Series([0.5, 0.6]), pd.Series([0, 0])))  # one fold: no spread


def test_paper_in_ci_includes_the_endpoints_and_is_undefined_without_a_paper_value():
    assert paper_in_ci(0.9, 0.85, 0.95) is True
    assert paper_in_ci(0.85, 0.85, 0.95) is True and paper_in_ci(0.95, 0.85, 0.95) is True
    assert paper_in_ci(0.96, 0.85, 0.95) is False
    assert paper_in_ci(math.nan, 0.85, 0.95) is None


FIVE = ["3d_cascade_roi", "3d_cascade_fullres", "2d", "3d_lowres", "3d_fullres"]  # not in order


@pytest.fixture
def five_configs(tmp_path: Path) -> dict[tuple[str, int], Path]:
    """Score files of five configurations x 5 folds x 3 cases, listed out of order; one NaN
    (2d, case_00004, dice_tumor)."""
    rng = np.random.default_rng(0)
    cases = [f"case_{i:05d}" for i in range(15)]
    base = rng.uniform(0.5, 1.0, size=(len(cases), len(METRIC_COLUMNS)))
    files = {}
    for j, config in enumerate(FIVE):
        values = np.clip(base + rng.normal(0, 0.05, size=base.shape) + 0.02 * j, 0, 1)
        df = pd.DataFrame(values, columns=METRIC_COLUMNS).assign(case=cases)
        if config == "2d":
            df.loc[4, "dice_tumor"] = np.nan
        for fold in range(5):
            path = tmp_path / "scores" / config / f"fold_{fold}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.iloc[fold::5][["case", *METRIC_COLUMNS]].to_csv(path, index=False)
            files[config, fold] = path
    return files


def test_configurations_keep_the_papers_order_and_others_follow():
    assert order_configs(FIVE) == [*CONFIG_ORDER, "3d_cascade_roi"]
    assert order_configs(["3d_cascade_roi", "2d"]) == ["2d", "3d_cascade_roi"]
    assert paper_values(["3d_cascade_roi"])["3d_cascade_roi"] == PAPER_TABLE1["3d_cascade_fullres"]


def test_table1_stats_rows_columns_and_paper_values_for_five_configurations(five_configs):
    table, per_case = collate(five_configs)
    assert list(table["model"]) == [*CONFIG_ORDER, "3d_cascade_roi"]
    stats = table1_stats(per_case, paper_values(table["model"]), StatsSettings(seed=1))
    assert list(stats.columns) == STATS_COLUMNS
    assert list(zip(stats["model"], stats["metric"], strict=True)) == [
        (m, k) for m in table["model"] for k in METRIC_COLUMNS
    ]
    cell = stats.set_index(["model", "metric"])
    # the same means as Table 1, NaN skipped
    for row in table.itertuples(index=False):
        for metric in METRIC_COLUMNS:
            assert cell.loc[(row.model, metric), "mean"] == pytest.approx(getattr(row, metric))
    assert cell.loc[("3d_cascade_roi", "dice_tumor"), "paper"] == 0.8710
    assert cell.loc[("2d", "sd_tumor"), "paper"] == 0.5787
    # the cascade is the reference: no test against itself
    assert stats.loc[stats["model"] == "3d_cascade_fullres", "p_vs_cascade"].isna().all()
    assert stats.loc[stats["model"] != "3d_cascade_fullres", "p_vs_cascade"].between(0, 1).all()
    # the 2d NaN: 14 cases in the bootstrap (sorted by case id), like the 14 in Table 1's mean
    tumor_2d = per_case.query("model == '2d' and metric == 'dice_tumor'").sort_values("case")
    tumor_2d = tumor_2d["value"].dropna().to_numpy()
    assert len(tumor_2d) == 14
    ci = cell.loc[("2d", "dice_tumor"), ["ci_low", "ci_high"]].tolist()
    assert ci == pytest.approx(list(bootstrap_ci(tumor_2d, seed=1)))


def test_without_the_cascade_p_vs_cascade_is_empty(five_configs):
    files = {k: v for k, v in five_configs.items() if k[0] != "3d_cascade_fullres"}
    table, per_case = collate(files)
    stats = table1_stats(per_case, paper_values(table["model"]), StatsSettings(seed=0))
    assert stats["p_vs_cascade"].isna().all()
    assert not stats["ci_low"].isna().any()


def test_write_table_writes_the_stats_csv_and_markdown_for_five_configurations(
    tmp_path, five_configs
):
    table, per_case = collate(five_configs)
    settings = StatsSettings(seed=3, n_resamples=2000)
    stats = table1_stats(per_case, paper_values(table["model"]), settings)
    outs = {k: tmp_path / "out" / f"{k}.x" for k in ("csv", "md", "stats", "per_case")}
    write_table(table, per_case, stats, settings, outs)
    with open(outs["stats"], newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == STATS_COLUMNS
    assert {(r["model"], r["metric"]) for r in rows} == {
        (m, k) for m in FIVE for k in METRIC_COLUMNS
    }
    assert [r["model"] for r in rows[:: len(METRIC_COLUMNS)]] == [*CONFIG_ORDER, "3d_cascade_roi"]
    for r in rows:
        assert r["paper_in_ci"] in ("True", "False")  # every configuration has a paper value
        assert (r["p_vs_cascade"] == "") == (r["model"] == "3d_cascade_fullres")
        assert float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
    md = outs["md"].read_text()
    assert "| 3d_cascade_roi | dice_kidney |" in md and "0.9748 †" in md
    assert "† `3d_cascade_roi`: the paper's value is its 3D Cascade row" in md
    assert "| reference |" in md and "Wilcoxon signed-rank" in md and "ddof=1" in md
    assert "2,000 resamples" in md and "seed 3" in md
    first = {k: p.read_bytes() for k, p in outs.items()}
    write_table(table, per_case, stats, settings, outs)
    assert {k: p.read_bytes() for k, p in outs.items()} == first


def test_per_case_figure_is_a_png_with_every_configuration(tmp_path, five_configs):
    table, per_case = collate(five_configs)
    out = tmp_path / "figs" / "fig3_per_case.png"
    plot_per_case(per_case, paper_values(table["model"]), out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    plot_per_case(per_case, paper_values(table["model"]), out)
    assert out.read_bytes() == data  # seeded jitter, no timestamp
