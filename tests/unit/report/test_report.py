"""Tests for kitsnet.report.table1 and kitsnet.report.figures on tiny hand-made inputs (CSV
scores, logs, 8x32x32 NIfTI volumes)."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kitsnet.core.io import KitsnetError
from kitsnet.report.figures import (
    plot_predictions,
    plot_progress,
    plot_reference,
    plot_training_curves,
)
from kitsnet.report.stats import StatsSettings, table1_stats
from kitsnet.report.table1 import (
    CONFIG_ORDER,
    METRIC_COLUMNS,
    PAPER_TABLE1,
    collate,
    paper_values,
    write_table,
)
from kitsnet.train.training_log import EPOCH_TIME_COLUMN, LOG_COLUMNS, write_training_log


def _scores(path: Path, rows: dict[str, list[float]]) -> Path:
    df = pd.DataFrame(
        [[case, *vals] for case, vals in rows.items()], columns=["case", *METRIC_COLUMNS]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def score_files(tmp_path: Path) -> dict[tuple[str, int], Path]:
    """Cascade and 2d, two folds each (listed out of order); no 3d_fullres / 3d_lowres rows."""
    d = tmp_path / "scores"
    return {
        ("3d_cascade_fullres", 1): _scores(
            d / "c" / "fold_1.csv", {"case_00002": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]}
        ),
        ("3d_cascade_fullres", 0): _scores(
            d / "c" / "fold_0.csv",
            {
                "case_00000": [1.0, 0.5, 0.25, 0.5, 0.5, 0.5],
                "case_00001": [0.8, 0.5, 0.25, 1, 0, 0],
            },
        ),
        ("2d", 0): _scores(d / "2d" / "fold_0.csv", {"case_00000": [0.5] * 6}),
        ("2d", 1): _scores(d / "2d" / "fold_1.csv", {"case_00001": [0.25] * 6}),
    }


def test_collate_means_order_and_long_format(score_files):
    table, per_case = collate(score_files)
    assert list(table.columns) == ["model", *METRIC_COLUMNS]
    assert list(table["model"]) == ["2d", "3d_cascade_fullres"]  # CONFIG_ORDER, absent rows absent
    casc = table.set_index("model").loc["3d_cascade_fullres"]
    # Mean over the three out-of-fold cases, not over the two fold means.
    assert casc["dice_kidney"] == pytest.approx((1.0 + 0.8 + 0.9) / 3)
    assert casc["dice_masses"] == pytest.approx((0.5 + 0.5 + 0.8) / 3)
    assert casc["sd_kidney"] == pytest.approx((0.5 + 1 + 0.6) / 3)
    assert table.set_index("model").loc["2d", "sd_tumor"] == pytest.approx(0.375)
    assert list(per_case.columns) == ["model", "fold", "case", "metric", "value"]
    assert len(per_case) == (3 + 2) * len(METRIC_COLUMNS)
    assert list(per_case["model"].unique()) == ["2d", "3d_cascade_fullres"]
    first = per_case[per_case["model"] == "3d_cascade_fullres"].iloc[0]
    assert (first["fold"], first["case"], first["metric"]) == (0, "case_00000", "dice_kidney")


def _write(table, per_case, outs):
    settings = StatsSettings(seed=0, n_resamples=500)
    stats = table1_stats(per_case, paper_values(table["model"]), settings)
    names = ("csv", "md", "per_case", "stats")
    write_table(table, per_case, stats, settings, dict(zip(names, outs, strict=True)))


def test_write_table_markdown_and_byte_identical(tmp_path, score_files):
    table, per_case = collate(score_files)
    outs = [tmp_path / "out" / n for n in ("table1.csv", "table1.md", "per_case.csv", "st.csv")]
    _write(table, per_case, outs)
    first = [p.read_bytes() for p in outs]
    _write(*collate(score_files), outs)
    assert [p.read_bytes() for p in outs] == first
    assert b"0.900000" in first[0]  # fixed float format: (1.0 + 0.8 + 0.9) / 3
    md = outs[1].read_text()
    assert "0.9748" in md and "0.8813" in md and "0.8710" in md
    assert f"{0.9 - 0.9748:.4f}" in md  # our cascade kidney Dice minus the paper's
    assert "| 3d_cascade_fullres | dice_kidney | 0.9000 ± " in md  # mean ± fold SD
    assert "| 3 |" in md  # number of cases for the cascade
    assert "0.5787" in md  # every paper value is listed, e.g. the 2D tumour Surface Dice
    assert "95% CI" in md and "p vs cascade" in md and "Paper in CI" in md
    assert "†" not in md  # no configuration compared with another's paper row


def test_configuration_without_a_paper_row_is_listed_after_the_papers(tmp_path, score_files):
    """3d_cascade_roi is compared with the paper's cascade (footnoted); the paper's four rows
    come first whatever order the files arrive in."""
    roi = {
        ("3d_cascade_roi", k): _scores(
            tmp_path / "scores" / "roi" / f"fold_{k}.csv", {f"case_0000{k}": [0.7] * 6}
        )
        for k in range(3)
    }
    table, per_case = collate({**roi, **score_files})
    assert list(table["model"]) == ["2d", "3d_cascade_fullres", "3d_cascade_roi"]
    assert list(per_case["model"].unique()) == list(table["model"])
    outs = [tmp_path / "out" / n for n in ("t.csv", "t.md", "pc.csv", "st.csv")]
    _write(table, per_case, outs)
    md = outs[1].read_text()
    assert "| 3d_cascade_roi | dice_kidney | 0.7000 ± 0.0000 | [0.7000, 0.7000] | 0.9748 † |" in md
    assert "† `3d_cascade_roi`: the paper's value is its 3D Cascade row" in md
    stats = pd.read_csv(outs[3])
    roi_kidney = stats.set_index(["model", "metric"]).loc[("3d_cascade_roi", "dice_kidney")]
    assert roi_kidney["paper"] == 0.9748 and not roi_kidney["paper_in_ci"]


def test_unknown_configuration_is_an_error(tmp_path):
    path = _scores(tmp_path / "s.csv", {"case_00000": [1.0] * 6})
    with pytest.raises(KitsnetError, match="unknown configuration '3d'"):
        collate({("3d", 0): path})


def test_paper_table_has_every_config_and_metric():
    assert list(PAPER_TABLE1) == CONFIG_ORDER
    for row in PAPER_TABLE1.values():
        assert set(row) == set(METRIC_COLUMNS)
        assert not any(math.isnan(v) for v in row.values())
    assert PAPER_TABLE1["3d_cascade_fullres"]["dice_kidney"] == 0.9748


def test_paper_table_is_the_papers_table_1(repo):
    """All 24 values equal the repository's cited transcription of the paper's Table 1
    (tests/data/paper_table1.tsv, in the paper's own names: 2D, 3D FullRes, 3D LowRes,
    3D Cascade; Dice then SD, each Kidney, "Cyst" = masses, Tumor), row by row."""
    names = {"2D": "2d", "3D FullRes": "3d_fullres", "3D LowRes": "3d_lowres"}
    names["3D Cascade"] = "3d_cascade_fullres"
    lines = (repo / "tests" / "data" / "paper_table1.tsv").read_text().splitlines()
    header, *rows = [line.split("\t") for line in lines if not line.startswith("#")]
    assert header[1:] == [f"{m}_{r}" for m in ("dice", "sd") for r in ("Kidney", "Cyst", "Tumor")]
    table = {names[cells[0]]: [float(c) for c in cells[1:]] for cells in rows}
    assert list(table) == list(names.values())
    for config, values in table.items():
        assert [PAPER_TABLE1[config][m] for m in METRIC_COLUMNS] == values


def test_missing_score_file_names_the_file(tmp_path, score_files):
    missing = tmp_path / "scores" / "3d_lowres" / "fold_0.csv"
    with pytest.raises(KitsnetError, match="fold_0.csv.*missing"):
        collate({**score_files, ("3d_lowres", 0): missing})


def test_missing_column_names_file_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"case": ["case_00000"], "dice_kidney": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(KitsnetError, match=r"bad\.csv.*sd_tumor"):
        collate({("2d", 0): bad})


def test_case_in_two_folds_is_an_error(tmp_path):
    a = _scores(tmp_path / "a.csv", {"case_00000": [1.0] * 6})
    b = _scores(tmp_path / "b.csv", {"case_00000": [1.0] * 6})
    with pytest.raises(KitsnetError, match="case_00000"):
        collate({("2d", 0): a, ("2d", 1): b})


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 0.8, 0.8, 1.0])), str(path))
    return path


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    rng = np.random.default_rng(0)
    out = {}
    for i, case in enumerate(["case_00000", "case_00001"]):
        ct = rng.normal(40, 80, size=(8, 32, 32)).astype(np.int16)
        seg = np.zeros((8, 32, 32), np.uint8)
        seg[2:7, 8:20, 8:20] = 1
        seg[3 + i, 10:16, 10:16] = 2
        if i == 0:
            seg[6, 16:19, 16:19] = 3  # cyst on another slice -> second row in the figure
        d = tmp_path / "data" / case
        out[case] = (_nifti(d / "imaging.nii.gz", ct), _nifti(d / "aggregated_MAJ_seg.nii.gz", seg))
    return out


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_reference_and_predictions(tmp_path, volumes):
    out1 = tmp_path / "figs" / "figure1.png"
    plot_reference([(c, img, ref) for c, (img, ref) in volumes.items()], out1)
    _png_ok(out1)
    preds = {
        cfg: {
            c: _nifti(tmp_path / "pred" / cfg / f"{c}.nii.gz", np.asarray(nib.load(ref).dataobj))
            for c, (_, ref) in volumes.items()
        }
        for cfg in ("3d_cascade_fullres", "2d")
    }
    out2 = tmp_path / "figs" / "figure2.png"
    cases = list(volumes)
    images = {c: v[0] for c, v in volumes.items()}
    refs = {c: v[1] for c, v in volumes.items()}
    plot_predictions(cases, images, refs, preds, out2)
    _png_ok(out2)
    first = out2.read_bytes()
    plot_predictions(cases, images, refs, preds, out2)
    assert out2.read_bytes() == first  # no timestamp / version in the PNG


def test_plot_predictions_missing_prediction(tmp_path, volumes):
    images = {c: v[0] for c, v in volumes.items()}
    refs = {c: v[1] for c, v in volumes.items()}
    missing = tmp_path / "pred" / "2d" / "case_00000.nii.gz"
    with pytest.raises(KitsnetError, match="case_00000"):
        plot_predictions(
            ["case_00000"], images, refs, {"2d": {"case_00000": missing}}, tmp_path / "f.png"
        )


def _log(path: Path, epochs: int = 5) -> Path:
    """A training log as the training loop writes it (its own writer, so the report is tested
    on the columns the loop really writes)."""
    history = [
        {
            "epoch": e,
            "train_loss": 1 - 0.1 * e,
            "val_loss": 1.1 - 0.1 * e,
            "pseudo_dice": 0.1 * e,
            "ema_pseudo_dice": 0.08 * e,
            "lr": 0.01 * (1 - e / epochs) ** 0.9,
            "epoch_time_s": 30.0 + e,
        }
        for e in range(epochs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_training_log(history, path)
    assert path.read_text().splitlines()[0].split(",") == LOG_COLUMNS
    return path


def test_training_plots(tmp_path):
    logs = {
        (cfg, k): _log(tmp_path / cfg / f"fold_{k}" / "training_log.csv")
        for cfg in ("3d_lowres", "2d")
        for k in range(2)
    }
    out = tmp_path / "curves.png"
    plot_training_curves(logs, out)
    _png_ok(out)
    prog = tmp_path / "progress.png"
    plot_progress(logs[("2d", 0)], prog)
    _png_ok(prog)
    with pytest.raises(KitsnetError, match="nope.csv"):
        plot_progress(tmp_path / "nope.csv", prog)


def test_training_curves_need_no_wall_clock_column_the_progress_plot_does(tmp_path):
    """The curves plot no time: a log without ``epoch_time_s`` still plots there, while the
    progress plot, which shows the epoch time, names the missing column."""
    path = _log(tmp_path / "2d" / "fold_0" / "training_log.csv")
    df = pd.read_csv(path).drop(columns=[EPOCH_TIME_COLUMN])
    df.to_csv(path, index=False)
    out = tmp_path / "curves.png"
    plot_training_curves({("2d", 0): path}, out)
    _png_ok(out)
    with pytest.raises(KitsnetError, match=EPOCH_TIME_COLUMN):
        plot_progress(path, tmp_path / "progress.png")
