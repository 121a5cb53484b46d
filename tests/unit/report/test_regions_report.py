"""Region-based configurations in the report: ``p_vs_labels`` (each ``<base>_regions`` against
its label-based base, rebuilt here with scipy's Wilcoxon on the paired differences), Table 1's
row order and markdown with a sixth configuration, and the figures with it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from kitsnet.report.figures import plot_per_case, plot_predictions, plot_training_curves
from kitsnet.report.stats import STATS_COLUMNS, StatsSettings, table1_stats
from kitsnet.report.table1 import (
    CONFIG_ORDER,
    METRIC_COLUMNS,
    collate,
    order_configs,
    paper_values,
    write_table,
)
from kitsnet.stages import CONFIGURATIONS
from kitsnet.train.training_log import write_training_log

CASES = [f"case_{i:05d}" for i in range(12)]
# distinct, non-zero, untied differences of the region-based model from its base
SHIFTS = [0.031, -0.012, 0.054, 0.007, 0.026, -0.019, 0.063, 0.015, -0.004, 0.042, 0.037, 0.021]
BASE = [0.91, 0.42, 0.77, 0.95, 0.63, 0.85, 0.12, 0.58, 0.93, 0.71, 0.34, 0.66]
SIX = [
    "3d_fullres_regions",
    "3d_cascade_roi",
    "3d_cascade_fullres",
    "2d",
    "3d_lowres",
    "3d_fullres",
]  # not in order


def _long(values: dict[str, list[float]], metrics=("dice_kidney", "dice_tumor")) -> pd.DataFrame:
    """A long per-case frame (model, fold, case, metric, value) as collate returns it; the
    second metric is the first minus 0.1 (the same differences)."""
    rows = []
    for model, vals in values.items():
        for i, (case, v) in enumerate(zip(CASES, vals, strict=True)):
            for k, metric in enumerate(metrics):
                rows.append((model, i % 5, case, metric, v - 0.1 * k))
    return pd.DataFrame(rows, columns=["model", "fold", "case", "metric", "value"])


def _scipy_p(x: list[float], y: list[float]) -> float:
    diff = np.round(np.asarray(x) - np.asarray(y), 12)
    return float(wilcoxon(diff, alternative="two-sided", zero_method="wilcox").pvalue)


def test_stats_columns_end_with_the_two_paired_tests():
    assert STATS_COLUMNS[-2:] == ["p_vs_cascade", "p_vs_labels"]
    assert "3d_fullres_regions" in CONFIGURATIONS


def test_p_vs_labels_is_the_wilcoxon_test_against_the_base_paired_on_case():
    regions = [b + s for b, s in zip(BASE, SHIFTS, strict=True)]
    cascade = [min(1.0, b + 0.02 * (i % 3)) for i, b in enumerate(BASE)]
    per_case = _long(
        {"3d_fullres": BASE, "3d_cascade_fullres": cascade, "3d_fullres_regions": regions}
    )
    # rows listed in another case order: the test pairs on case id, not on position
    per_case = per_case.sample(frac=1.0, random_state=0).reset_index(drop=True)
    stats = table1_stats(per_case, {}, StatsSettings(seed=0, n_resamples=200))
    cell = stats.set_index(["model", "metric"])
    want = _scipy_p(regions, BASE)
    assert 0.0 < want < 0.05  # mostly positive shifts
    for metric in ("dice_kidney", "dice_tumor"):
        assert cell.loc[("3d_fullres_regions", metric), "p_vs_labels"] == pytest.approx(
            want, rel=1e-12
        )
        # the test against the cascade is unchanged, and is another test
        p_cascade = cell.loc[("3d_fullres_regions", metric), "p_vs_cascade"]
        assert p_cascade == pytest.approx(_scipy_p(regions, cascade), rel=1e-12)
    # label-based rows have no base to be tested against
    labels = stats[stats["model"] != "3d_fullres_regions"]
    assert labels["p_vs_labels"].isna().all()


def test_p_vs_labels_drops_unpaired_and_nan_cases():
    regions = [b + s for b, s in zip(BASE, SHIFTS, strict=True)]
    regions[3] = math.nan  # case_00003 dropped
    per_case = _long({"3d_fullres": BASE, "3d_fullres_regions": regions})
    per_case = per_case[~((per_case["model"] == "3d_fullres") & (per_case["case"] == CASES[7]))]
    keep = [i for i in range(len(CASES)) if i not in (3, 7)]
    stats = table1_stats(per_case, {}, StatsSettings(seed=0, n_resamples=200))
    got = stats.set_index(["model", "metric"]).loc[("3d_fullres_regions", "dice_kidney")]
    want = _scipy_p([regions[i] for i in keep], [BASE[i] for i in keep])
    assert got["p_vs_labels"] == pytest.approx(want, rel=1e-12)


def test_p_vs_labels_is_nan_without_the_base_and_pairs_each_region_model_with_its_own():
    shifted = [b + s for b, s in zip(BASE, SHIFTS, strict=True)]
    per_case = _long(
        {
            "3d_fullres_regions": shifted,
            "3d_cascade_fullres": BASE,
            "3d_cascade_fullres_regions": shifted,
        }
    )
    stats = table1_stats(per_case, {}, StatsSettings(seed=0, n_resamples=200))
    cell = stats.set_index(["model", "metric"])
    for metric in ("dice_kidney", "dice_tumor"):
        assert math.isnan(cell.loc[("3d_fullres_regions", metric), "p_vs_labels"])  # no base
        # the cascade's regions variant: its base is the cascade, so both tests coincide
        got = cell.loc[("3d_cascade_fullres_regions", metric)]
        assert got["p_vs_labels"] == pytest.approx(_scipy_p(shifted, BASE), rel=1e-12)
        assert got["p_vs_labels"] == got["p_vs_cascade"]
        assert math.isnan(cell.loc[("3d_cascade_fullres", metric), "p_vs_labels"])


def test_region_configuration_is_accepted_and_ordered_after_the_others():
    assert order_configs(SIX) == [*CONFIG_ORDER, "3d_cascade_roi", "3d_fullres_regions"]
    assert order_configs(["3d_fullres_regions", "3d_fullres"]) == [
        "3d_fullres",
        "3d_fullres_regions",
    ]
    # the paper has no region-based row: no paper value to compare with
    assert all(
        math.isnan(v) for v in paper_values(["3d_fullres_regions"])["3d_fullres_regions"].values()
    )


@pytest.fixture
def six_configs(tmp_path: Path) -> dict[tuple[str, int], Path]:
    """Score files of six configurations (the five and 3d_fullres_regions) x 5 folds x 15
    cases, listed out of order."""
    rng = np.random.default_rng(0)
    cases = [f"case_{i:05d}" for i in range(15)]
    base = rng.uniform(0.5, 1.0, size=(len(cases), len(METRIC_COLUMNS)))
    files = {}
    for j, config in enumerate(SIX):
        values = np.clip(base + rng.normal(0, 0.05, size=base.shape) + 0.02 * j, 0, 1)
        df = pd.DataFrame(values, columns=METRIC_COLUMNS).assign(case=cases)
        for fold in range(5):
            path = tmp_path / "scores" / config / f"fold_{fold}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.iloc[fold::5][["case", *METRIC_COLUMNS]].to_csv(path, index=False)
            files[config, fold] = path
    return files


def _write(tmp_path: Path, files: dict) -> tuple[dict[str, Path], pd.DataFrame]:
    table, per_case = collate(files)
    settings = StatsSettings(seed=3, n_resamples=500)
    stats = table1_stats(per_case, paper_values(table["model"]), settings)
    outs = {k: tmp_path / "out" / f"{k}.x" for k in ("csv", "md", "stats", "per_case")}
    write_table(table, per_case, stats, settings, outs)
    return outs, stats


def test_table1_with_a_region_row_shows_p_vs_labels_and_explains_the_row(tmp_path, six_configs):
    outs, stats = _write(tmp_path, six_configs)
    table = pd.read_csv(outs["csv"])
    assert list(table["model"]) == [*CONFIG_ORDER, "3d_cascade_roi", "3d_fullres_regions"]
    with open(outs["stats"], newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == STATS_COLUMNS
    for r in rows:
        assert (r["p_vs_labels"] != "") == (r["model"] == "3d_fullres_regions")
        if r["model"] == "3d_fullres_regions":
            assert r["paper"] == "" and r["paper_in_ci"] == ""  # the paper has no such row
    md = outs["md"].read_text()
    assert "| p vs cascade | p vs labels | nnU-Net baseline | Cases |" in md
    cell = stats.set_index(["model", "metric"])
    p = cell.loc[("3d_fullres_regions", "dice_tumor"), "p_vs_labels"]
    p_text = "<0.0001" if p < 1e-4 else f"{p:.4f}"
    line = next(x for x in md.splitlines() if x.startswith("| 3d_fullres_regions | dice_tumor |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "n/a" and cells[8] == p_text  # Paper n/a; p vs labels
    base_line = next(x for x in md.splitlines() if x.startswith("| 3d_fullres | dice_tumor |"))
    assert [c.strip() for c in base_line.strip("|").split("|")][8] == "base"
    other = next(x for x in md.splitlines() if x.startswith("| 2d | dice_tumor |"))
    assert [c.strip() for c in other.strip("|").split("|")][8] == "n/a"
    assert "- p vs labels: the same test of a `<configuration>_regions` row" in md
    assert "`<configuration>_regions` rows: " in md
    assert "regions_class_order (1, 3, 2)" in md and "binary cross-entropy" in md
    assert "masses = tumor + cyst" in md and "softmax over the labels" in md


def test_table1_without_a_region_row_has_no_p_vs_labels_column(tmp_path, six_configs):
    files = {k: v for k, v in six_configs.items() if k[0] != "3d_fullres_regions"}
    outs, stats = _write(tmp_path, files)
    assert stats["p_vs_labels"].isna().all()
    md = outs["md"].read_text()
    assert "p vs labels" not in md and "_regions" not in md
    assert "| p vs cascade | nnU-Net baseline | Cases |" in md


def test_per_case_figure_and_training_curves_take_a_sixth_configuration(tmp_path, six_configs):
    table, per_case = collate(six_configs)
    out = tmp_path / "fig3.png"
    plot_per_case(per_case, paper_values(table["model"]), out)
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    history = [
        {
            "epoch": e,
            "train_loss": 1 - 0.1 * e,
            "val_loss": 1.1 - 0.1 * e,
            "pseudo_dice": 0.1 * e,
            "ema_pseudo_dice": 0.08 * e,
            "lr": 0.01,
            "epoch_time_s": 30.0,
        }
        for e in range(3)
    ]
    logs = {}
    for config in SIX:
        path = tmp_path / "models" / config / "fold_0" / "training_log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_training_log(history, path)
        logs[config, 0] = path
    curves = tmp_path / "curves.png"
    plot_training_curves(logs, curves)
    assert curves.read_bytes().startswith(b"\x89PNG")


def test_figure_2_takes_a_sixth_configuration(tmp_path):
    affine = np.diag([3.0, 0.8, 0.8, 1.0])
    ct = np.random.default_rng(0).normal(40, 80, size=(6, 24, 24)).astype(np.int16)
    seg = np.zeros((6, 24, 24), np.uint8)
    seg[1:5, 6:18, 6:18] = 1
    seg[2, 9:14, 9:14] = 2
    paths = {}
    for name, array in (("image", ct), ("ref", seg)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(paths[name]))
    preds = {}
    for config in SIX:
        path = tmp_path / "pred" / config / "case_00000.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(seg, affine), str(path))
        preds[config] = {"case_00000": path}
    out = tmp_path / "fig2.png"
    case = "case_00000"
    plot_predictions([case], {case: paths["image"]}, {case: paths["ref"]}, preds, out)
    assert out.read_bytes().startswith(b"\x89PNG")
