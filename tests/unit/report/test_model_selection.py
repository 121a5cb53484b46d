"""Model selection: two rows per model (without and with its postprocessing), the arg-max of
the mean KiTS21 score as best_configuration.json, and its section in table1.md."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kitsnet.core.io import KitsnetError
from kitsnet.evaluate.metrics import METRIC_COLUMNS
from kitsnet.postprocess.selection import SELECTION_COLUMNS, read_best, write_selection
from kitsnet.report.selection import selection_markdown


def _decision(tmp_path, model, raw, post, steps):
    configs = model.split("+")
    scores = {
        "raw": dict.fromkeys(METRIC_COLUMNS, raw),
        "postprocessed": dict.fromkeys(METRIC_COLUMNS, post),
    }
    d = {"model": model, "configurations": configs, "steps": steps, "min_volume_mm3": 12.5}
    path = tmp_path / f"{model}.json"
    path.write_text(json.dumps({**d, "scores": scores}))
    return path


def test_selection_lists_every_model_with_and_without_postprocessing_and_picks_the_best(
    tmp_path,
):
    decisions = {
        "2d": _decision(tmp_path, "2d", 0.5, 0.5, []),
        "3d_fullres": _decision(tmp_path, "3d_fullres", 0.6, 0.65, ["kidney_two_largest"]),
        "2d+3d_fullres": _decision(tmp_path, "2d+3d_fullres", 0.7, 0.69, ["foreground_largest"]),
    }
    best = write_selection(decisions, [0, 1], tmp_path / "sel.csv", tmp_path / "best.json")
    table = pd.read_csv(tmp_path / "sel.csv")
    assert list(table.columns) == SELECTION_COLUMNS
    assert list(table["model"]) == ["2d", "2d", "3d_fullres", "3d_fullres", *["2d+3d_fullres"] * 2]
    assert list(table["postprocessed"]) == [False, True] * 3
    assert table["kits_score"].tolist() == pytest.approx([0.5, 0.5, 0.6, 0.65, 0.7, 0.69])
    # the ensemble without its postprocessing (which would lower its score)
    assert best["model"] == "2d+3d_fullres" and best["ensemble"] is True
    assert best["postprocessed"] is False and best["postprocessing"]["steps"] == []
    assert best["configurations"] == ["2d", "3d_fullres"] and best["folds"] == [0, 1]
    assert read_best(tmp_path / "best.json") == best
    md = selection_markdown(tmp_path / "sel.csv")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| **2d+3d_fullres** | **false** | **0.7000**")
    assert len(rows) == 1 + 6


def test_a_tie_keeps_the_simpler_model(tmp_path):
    decisions = {
        "3d_lowres": _decision(tmp_path, "3d_lowres", 0.8, 0.8, ["kidney_min_volume"]),
        "3d_lowres+2d": _decision(tmp_path, "3d_lowres+2d", 0.8, 0.8, []),
    }
    best = write_selection(decisions, [0], tmp_path / "s.csv", tmp_path / "b.json")
    assert best["model"] == "3d_lowres" and best["postprocessed"] is False


def test_a_decision_of_another_model_or_without_scores_is_an_error(tmp_path):
    path = _decision(tmp_path, "2d", 0.5, 0.5, [])
    with pytest.raises(KitsnetError, match="holds model '2d', not '3d_fullres'"):
        write_selection({"3d_fullres": path}, [0], tmp_path / "s.csv", tmp_path / "b.json")
    path.write_text(json.dumps({"model": "2d", "configurations": ["2d"], "scores": {}}))
    with pytest.raises(KitsnetError, match="2d.json: no 'raw' scores"):
        write_selection({"2d": path}, [0], tmp_path / "s.csv", tmp_path / "b.json")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "b.json").exists()


def test_prediction_without_a_best_configuration_says_how_to_get_one(tmp_path):
    with pytest.raises(KitsnetError, match="run the workflow to the end .* or name the model"):
        read_best(tmp_path / "results" / "best_configuration.json")
