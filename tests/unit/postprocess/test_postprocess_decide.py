"""The greedy decision, the crops it runs on, the full scores, the JSON and the per-case CSV.

Toy cross-validation sets are written as NIfTI files: references with two kidneys (and a tumor,
a cyst), predictions that are the references with false-positive blobs and an eroded kidney.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from kitsnet.core.io import KitsnetError, load_volume, save_volume
from kitsnet.evaluate.metrics import METRIC_COLUMNS, score_arrays
from kitsnet.postprocess.apply import apply_steps
from kitsnet.postprocess.candidates import CANDIDATES
from kitsnet.postprocess.crops import crop_dice, load_case_crop
from kitsnet.postprocess.decide import (
    PER_CASE_COLUMNS,
    decide_steps,
    postprocess_model,
    write_decision,
    write_per_case,
)

SPACING = (2.0, 1.0, 1.0)
SHAPE = (24, 36, 48)


def reference(seed: int) -> np.ndarray:
    """Two kidneys of slightly different sizes per case, a tumor in one, a cyst in the other."""
    ref = np.zeros(SHAPE, np.uint8)
    d = seed % 3
    ref[4 : 16 + d, 6:24, 3:14] = 1
    ref[8:12, 10 : 14 + d, 10:14] = 2
    ref[5:17, 8 : 22 - d, 30:41] = 1
    ref[6:9, 9:12, 30:33] = 3
    return ref


def noisy(ref: np.ndarray, seed: int) -> np.ndarray:
    """The reference with an eroded kidney edge and small false positives away from it."""
    pred = ref.copy()
    pred[4, :, :] = 0  # under-segmented top slice
    pred[20:22, 28:30, 20 + seed : 22 + seed] = 1  # kidney-label blob
    pred[1:3, 30:33, 24:27] = 2  # floating "tumor"
    return pred


def write_case(root: Path, case: str, pred: np.ndarray, ref: np.ndarray, spacing=SPACING):
    affine = np.diag([*spacing, 1.0])
    pred_path, ref_path = root / "pred" / f"{case}.nii.gz", root / "ref" / case / "seg.nii.gz"
    save_volume(np.asfortranarray(pred), pred_path, affine)
    save_volume(np.asfortranarray(ref), ref_path, affine)
    return pred_path, ref_path


@pytest.fixture()
def toy_set(tmp_path) -> dict[str, tuple[int, Path, Path]]:
    cases = {}
    for i in range(4):
        ref = reference(i)
        case = f"case_{i:05d}"
        cases[case] = (i % 2, *write_case(tmp_path, case, noisy(ref, i), ref))
    return cases


def test_decision_removes_false_positives_and_rejects_deleting_a_kidney(toy_set):
    decision, per_case = postprocess_model("3d_fullres", ["3d_fullres"], toy_set, None, jobs=1)
    records = {r["name"]: r for r in decision["candidates"]}
    assert [r["name"] for r in decision["candidates"]] == list(CANDIDATES)
    assert decision["steps"][0] == "kidney_min_volume"  # the blobs are far below the threshold
    min_volume = records["kidney_min_volume"]
    assert min_volume["score_after"] > min_volume["score_before"]
    # every reference has two kidneys: nnU-Net's largest-foreground rule hurts and is rejected
    fg = records["foreground_largest"]
    assert not fg["accepted"] and fg["score_after"] < fg["score_before"]
    assert "foreground_largest" not in decision["steps"]
    for r in decision["candidates"]:
        assert r["accepted"] == (r["name"] in decision["steps"])
        assert r["accepted"] == (r["score_after"] > r["score_before"])
    post, raw = decision["scores"]["postprocessed"], decision["scores"]["raw"]
    assert post["dice_kidney"] > raw["dice_kidney"] and post["kits_score"] > raw["kits_score"]
    assert set(per_case["postprocessed"]) == {False, True}


def test_min_volume_is_learned_from_the_references(toy_set):
    decision, _ = postprocess_model("m", ["m"], toy_set, None)
    # smallest kidney-region component over the references: case_00002's right kidney
    # (12 x 12 x 11 voxels of 2 mm3); the cyst and tumor lie inside their kidneys
    assert decision["min_volume_mm3"] == 0.5 * 12 * 12 * 11 * 2.0


def test_decision_json_has_the_documented_keys(toy_set, tmp_path):
    decision, per_case = postprocess_model("a+b", ["a", "b"], toy_set, None)
    path = tmp_path / "out" / "a+b.json"
    write_decision(decision, path)
    back = json.loads(path.read_text())
    assert set(back) == {
        "model",
        "configurations",
        "steps",
        "min_volume_mm3",
        "decided_on",
        "candidates",
        "scores",
        "cases",
    }
    assert back["model"] == "a+b" and back["configurations"] == ["a", "b"] and back["cases"] == 4
    assert isinstance(back["decided_on"], str) and "folds [0, 1]" in back["decided_on"]
    for record in back["candidates"]:
        assert set(record) == {"name", "accepted", "score_before", "score_after"}
    for which in ("raw", "postprocessed"):
        scores = back["scores"][which]
        assert list(scores) == sorted([*METRIC_COLUMNS, "kits_score"])
        assert scores["kits_score"] == pytest.approx(np.mean([scores[c] for c in METRIC_COLUMNS]))


def test_per_case_scores_are_the_full_metrics_of_apply_steps(toy_set, tmp_path):
    decision, per_case = postprocess_model("m", ["m"], toy_set, None, jobs=2)
    assert list(per_case.columns) == PER_CASE_COLUMNS and len(per_case) == 2 * len(toy_set)
    for case, (fold, pred_path, ref_path) in toy_set.items():
        pred, ref = load_volume(pred_path).array, load_volume(ref_path).array
        pp = apply_steps(pred, SPACING, decision["steps"], decision["min_volume_mm3"])
        rows = per_case[per_case["case"] == case].set_index("postprocessed")
        assert (rows["fold"] == fold).all()
        for flag, arr in ((False, pred), (True, pp)):
            want = score_arrays(arr, ref, SPACING)
            assert rows.loc[flag, METRIC_COLUMNS].tolist() == [want[c] for c in METRIC_COLUMNS]
    path = tmp_path / "per_case.csv"
    write_per_case(per_case, path)
    text = path.read_text().splitlines()
    assert text[0] == ",".join(PER_CASE_COLUMNS)
    assert {line.split(",")[2] for line in text[1:]} == {"true", "false"}
    back = pd.read_csv(path)
    assert back["postprocessed"].dtype == bool
    np.testing.assert_array_equal(back[METRIC_COLUMNS].to_numpy(), per_case[METRIC_COLUMNS])


def test_crop_dice_equals_the_dice_of_the_full_arrays(toy_set):
    """The memory path: Dice from the compressed crop plus the reference voxels outside it."""
    for case, (fold, pred_path, ref_path) in toy_set.items():
        crop = load_case_crop(case, fold, pred_path, ref_path)
        pred, ref = load_volume(pred_path).array, load_volume(ref_path).array
        assert crop.pred_array().size < pred.size
        for steps in ([], ["kidney_two_largest"], ["foreground_largest", "label_largest_2"]):
            from kitsnet.postprocess.apply import apply_to_crop

            small = crop.pred_array()
            apply_to_crop(small, crop.voxel_mm3, steps, None)
            full = score_arrays(apply_steps(pred, SPACING, steps, None), ref, SPACING)
            got = crop_dice(small, crop.ref_array(), crop.ref_outside)
            assert got == [full["dice_kidney"], full["dice_masses"], full["dice_tumor"]]


def test_reference_outside_the_prediction_crop_counts(tmp_path):
    ref = reference(0)
    pred = ref.copy()
    pred[:, :, 25:] = 0  # the right kidney is missed entirely: outside the prediction's box
    cases = {"case_00009": (0, *write_case(tmp_path, "case_00009", pred, ref))}
    crop = load_case_crop("case_00009", *cases["case_00009"])
    assert crop.ref_outside[0] == np.count_nonzero(ref[:, :, 25:])
    _, per_case = postprocess_model("m", ["m"], cases, None)
    # scored as read from the files (Fortran order: the surface sums run in memory order)
    want = score_arrays(*(load_volume(p).array for p in cases["case_00009"][1:]), SPACING)
    assert per_case.iloc[0][METRIC_COLUMNS].tolist() == [want[c] for c in METRIC_COLUMNS]
    empty = {"case_00010": (0, *write_case(tmp_path, "case_00010", 0 * ref, ref))}
    decision, per_case = postprocess_model("m", ["m"], empty, None)
    assert decision["steps"] == [] and per_case["dice_kidney"].tolist() == [0.0, 0.0]


def test_no_accepted_step_keeps_the_raw_scores_without_rescoring(tmp_path):
    cases = {}
    for i in range(2):
        ref = reference(i)
        cases[f"c{i}"] = (0, *write_case(tmp_path, f"c{i}", ref, ref))
    raw = pd.DataFrame([{"case": c, **dict.fromkeys(METRIC_COLUMNS, 0.5)} for c in cases])
    decision, per_case = postprocess_model("m", ["m"], cases, raw)
    assert decision["steps"] == []
    assert not any(r["accepted"] for r in decision["candidates"])
    # the given raw scores are used as they are, and nothing was rescored
    assert (per_case[METRIC_COLUMNS] == 0.5).all().all()
    assert decision["scores"]["raw"] == decision["scores"]["postprocessed"]


def test_raw_score_table_must_cover_every_case(toy_set):
    raw = pd.DataFrame([{"case": "case_00000", **dict.fromkeys(METRIC_COLUMNS, 1.0)}])
    with pytest.raises(KitsnetError, match=r"no row for case\(s\) \['case_00001'"):
        postprocess_model("m", ["m"], toy_set, raw)
    with pytest.raises(KitsnetError, match="lacks column"):
        postprocess_model("m", ["m"], toy_set, raw.drop(columns="sd_tumor"))


def test_decide_steps_accepts_only_strict_improvements(toy_set):
    crops = [load_case_crop(c, *spec) for c, spec in sorted(toy_set.items())]
    steps, records, after = decide_steps(crops, None, candidates=["kidney_min_volume"])
    assert steps == [] and records[0]["score_after"] is None  # no threshold: not tried
    steps, records, after = decide_steps(crops, 1e9, candidates=["kidney_min_volume"])
    assert steps == [] and records[0]["score_after"] < records[0]["score_before"]  # deletes all
    steps, records, after = decide_steps(crops, None, candidates=["masses_on_kidney"])
    assert steps == ["masses_on_kidney"] and all(c.changed for c in after)


@pytest.mark.parametrize("what", ["shape", "spacing", "missing", "label"])
def test_bad_prediction_is_named_with_case_and_file(tmp_path, what):
    ref = reference(0)
    pred = noisy(ref, 0)
    spacing = SPACING
    if what == "shape":
        pred = pred[:, :, :-1]
    elif what == "spacing":
        spacing = (2.5, 1.0, 1.0)
    elif what == "label":
        pred[0, 0, 0] = 7
    pred_path, ref_path = write_case(tmp_path, "case_00042", pred, ref)
    if what == "spacing":
        save_volume(np.asfortranarray(pred), pred_path, np.diag([*spacing, 1.0]))
    if what == "missing":
        pred_path.unlink()
    cases = {"case_00042": (0, pred_path, ref_path)}
    message = {"shape": "has shape", "spacing": "has spacing", "missing": "file is missing"}
    with pytest.raises(KitsnetError) as err:
        postprocess_model("m", ["m"], cases, None)
    text = str(err.value)
    assert "case_00042" in text and str(pred_path) in text
    assert message.get(what, "label 7 outside 0-3") in text
    if what in ("shape", "spacing"):
        assert str(ref_path) in text


def test_workflow_adapter_reads_folds_splits_labels_and_scores(tmp_path, repo):
    root = tmp_path / "results"
    splits, labels, scores = [], [], []
    for fold in range(2):
        val = [f"case_{fold}{i:04d}" for i in range(2)]
        splits.append({"train": [], "val": val})
        rows = []
        for i, case in enumerate(val):
            ref = reference(i)
            pred_path, ref_path = write_case(root, case, noisy(ref, i), ref)
            dest = root / "predictions" / f"fold_{fold}" / pred_path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            pred_path.rename(dest)
            labels.append(str(ref_path))
            rows.append({"case": case, **score_arrays(noisy(ref, i), ref, SPACING)})
        scores.append(root / f"fold_{fold}.csv")
        pd.DataFrame(rows).to_csv(scores[-1], index=False)
    (root / "splits.json").write_text(json.dumps(splits))
    out = SimpleNamespace(decision=str(root / "pp" / "m.json"), per_case=str(root / "pp.csv"))
    out.keys = lambda: ["decision", "per_case"]
    inputs = SimpleNamespace(
        predictions=[str(root / "predictions" / f"fold_{k}") for k in range(2)],
        splits=str(root / "splits.json"),
        labels=labels,
        scores=[str(s) for s in scores],
    )
    inputs.keys = lambda: ["predictions", "splits", "labels", "scores"]
    snakemake = SimpleNamespace(
        input=inputs,
        output=out,
        params=SimpleNamespace(model="m", configurations=["m"], jobs=1),
        log=[str(tmp_path / "logs" / "pp.log")],
    )
    script = repo / "workflow_scripts" / "postprocess.py"
    runpy.run_path(str(script), init_globals={"snakemake": snakemake})
    decision = json.loads(Path(out.decision).read_text())
    assert decision["cases"] == 4 and decision["steps"]
    per_case = pd.read_csv(out.per_case)
    assert sorted(set(per_case["fold"])) == [0, 1] and len(per_case) == 8


def test_crops_compress_and_decompress_slab_by_slab(monkeypatch):
    from kitsnet.postprocess import components, crops

    rng = np.random.default_rng(5)
    vol = np.asfortranarray(rng.integers(0, 4, (17, 23, 29)).astype(np.uint8))
    view = vol.transpose(2, 1, 0)[3:20, 1:22, 2:15]  # a non-contiguous crop
    whole = crops.compress(view)
    monkeypatch.setattr(components, "CHUNK_VOXELS", 100)
    monkeypatch.setattr(crops, "CHUNK_VOXELS", 100)
    pieces = crops.compress(view)
    for data in (whole, pieces):
        np.testing.assert_array_equal(crops.decompress(data, view.shape), view)
    with pytest.raises(ValueError, match="expected"):
        crops.decompress(whole, (18, 21, 13))
