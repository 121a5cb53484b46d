"""Tests for kitsnet.evaluate: the KiTS21 definition, exactness of the fast path, errors, CLI.

The real-data tests use the label maps of a KiTS21 clone that $KITSNET_KITS21_LABELS points at
(12 cases in CI: MAJ reference, AND and OR aggregations as imperfect "predictions") and compare
``kitsnet evaluate`` with a literal whole-volume surface-distance computation of the official
definition on all 24 pairs.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage

from kitsnet.core.io import KitsnetError, save_volume
from kitsnet.data.dataset import label_maps_from_env
from kitsnet.evaluate import surface
from kitsnet.evaluate.folders import add_cli, evaluate_pairs, pair_folder, write_scores
from kitsnet.evaluate.metrics import (
    HEC_LABELS,
    METRIC_COLUMNS,
    SD_TOLERANCE_MM,
    score_arrays,
    score_case,
)
from tests.reference.kits21_official import reference_score_arrays, reference_score_case

MAPS, NO_MAPS = label_maps_from_env()  # $KITSNET_KITS21_LABELS (see kitsnet.data.dataset)
CASES = [
    "case_00003",
    "case_00026",
    "case_00057",
    "case_00095",
    "case_00115",
    "case_00136",
    "case_00160",
    "case_00191",
    "case_00215",
    "case_00233",
    "case_00268",
    "case_00287",
]
AGGREGATIONS = ["AND", "OR"]
EXACT = 1e-9  # the bound; observed differences are a few ulps

needs_data = pytest.mark.skipif(not MAPS, reason=NO_MAPS)


def _map(case: str, agg: str) -> Path:
    """The real label map of ``case`` aggregated as ``agg`` (MAJ: the reference)."""
    return MAPS[case][agg]


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    save_volume(array, path, np.diag([*spacing, 1.0]), spacing=spacing)
    return path


def _assert_same(fast: dict, ref: dict, tol: float = EXACT) -> None:
    for col in METRIC_COLUMNS:
        assert abs(fast[col] - ref[col]) <= tol, (col, fast[col], ref[col])


def _read_scores(path: Path) -> pd.DataFrame:
    """Read a scores CSV with exact float parsing (Python's float(), any pandas version)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else None)
    for col in METRIC_COLUMNS:
        df[col] = [float(v) for v in df[col]]
    return df


def _cube(shape, lo, hi, label=1, dtype=np.uint8) -> np.ndarray:
    arr = np.zeros(shape, dtype=dtype)
    arr[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = label
    return arr


# ------------------------------------------------------------------ definition


def test_hec_classes_and_tolerances_are_the_kits21_ones():
    assert HEC_LABELS == {"kidney": (1, 2, 3), "masses": (2, 3), "tumor": (2,)}
    assert SD_TOLERANCE_MM == {
        "kidney": 1.0330772532390826,
        "masses": 1.1328796488598762,
        "tumor": 1.1498198361434828,
    }
    assert METRIC_COLUMNS == [
        "dice_kidney",
        "dice_masses",
        "dice_tumor",
        "sd_kidney",
        "sd_masses",
        "sd_tumor",
    ]


def test_identical_masks_score_one():
    seg = _cube((20, 20, 20), (4, 4, 4), (14, 14, 14), label=1)
    seg[6:10, 6:10, 6:10] = 2
    seg[11:13, 11:13, 11:13] = 3
    scores = score_arrays(seg, seg.copy(), (1.0, 0.8, 0.8))
    assert all(scores[c] == 1.0 for c in METRIC_COLUMNS)


def test_cubes_shifted_by_one_voxel_have_dice_0_9_in_every_class():
    # 10^3 tumor cubes overlapping in 9 of 10 slices: 2*900/2000 = 0.9 for every HEC.
    pred = _cube((24, 24, 24), (5, 5, 5), (15, 15, 15), label=2)
    ref = _cube((24, 24, 24), (6, 5, 5), (16, 15, 15), label=2)
    scores = score_arrays(pred, ref, (1.0, 1.0, 1.0))
    for name in HEC_LABELS:
        assert scores[f"dice_{name}"] == pytest.approx(0.9, abs=1e-15)
    # one voxel (1 mm) apart is within every tolerance (> 1 mm): perfect surface agreement
    for name in HEC_LABELS:
        assert scores[f"sd_{name}"] == 1.0
    _assert_same(scores, reference_score_arrays(pred, ref, (1.0, 1.0, 1.0)))


def test_cubes_shifted_beyond_tolerance_lose_surface_dice():
    pred = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15), label=1)
    ref = _cube((30, 30, 30), (8, 5, 5), (18, 15, 15), label=1)
    scores = score_arrays(pred, ref, (1.0, 1.0, 1.0))
    assert scores["dice_kidney"] == pytest.approx(0.7)
    assert 0.0 < scores["sd_kidney"] < 1.0
    _assert_same(scores, reference_score_arrays(pred, ref, (1.0, 1.0, 1.0)))


def test_disjoint_masks_score_zero():
    pred = _cube((40, 40, 40), (2, 2, 2), (8, 8, 8), label=1)
    ref = _cube((40, 40, 40), (30, 30, 30), (36, 36, 36), label=1)
    scores = score_arrays(pred, ref, (1.0, 1.0, 1.0))
    assert scores["dice_kidney"] == 0.0 and scores["sd_kidney"] == 0.0


def test_class_empty_in_both_scores_one():
    # kidney only: masses and tumor are empty in both -> Dice 1, Surface Dice 1
    pred = _cube((20, 20, 20), (4, 4, 4), (12, 12, 12), label=1)
    ref = _cube((20, 20, 20), (5, 4, 4), (12, 12, 12), label=1)
    for score in (score_arrays, reference_score_arrays):
        scores = score(pred, ref, (1, 1, 1))
        for name in ("masses", "tumor"):
            assert scores[f"dice_{name}"] == 1.0 and scores[f"sd_{name}"] == 1.0


def test_class_empty_in_one_scores_zero():
    ref = _cube((20, 20, 20), (4, 4, 4), (12, 12, 12), label=1)
    ref[6:9, 6:9, 6:9] = 2
    pred = _cube((20, 20, 20), (4, 4, 4), (12, 12, 12), label=1)  # tumor missed
    for a, b in ((pred, ref), (ref, pred)):  # missed and hallucinated tumor
        for scores in (score_arrays(a, b, (1, 1, 1)), reference_score_arrays(a, b, (1, 1, 1))):
            for name in ("masses", "tumor"):
                assert scores[f"dice_{name}"] == 0.0 and scores[f"sd_{name}"] == 0.0
            assert scores["dice_kidney"] == 1.0


def test_all_background_scores_one():
    empty = np.zeros((8, 9, 10), np.uint8)
    scores = score_arrays(empty, empty, (1, 1, 1))
    assert scores == dict.fromkeys(METRIC_COLUMNS, 1.0)
    assert reference_score_arrays(empty, empty, (1, 1, 1)) == scores


# ------------------------------------------------------------------ exactness of the fast path


def _random_labels(rng: np.random.Generator, shape, touch_border: bool) -> np.ndarray:
    """Smooth random blobs with kidney, tumor and cyst labels."""
    noise = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    seg = np.zeros(shape, np.uint8)
    seg[noise > 0.05] = 1
    seg[noise > 0.15] = 2
    seg[(noise > 0.12) & (noise < 0.14)] = 3
    if not touch_border:
        seg[:3], seg[-3:], seg[:, :3], seg[:, -3:], seg[:, :, :3], seg[:, :, -3:] = 0, 0, 0, 0, 0, 0
    return seg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", ["C", "F"])
def test_fast_path_equals_whole_volume_reference_on_random_blobs(seed, order):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(20, 40, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, size=3))
    touch = seed % 2 == 0  # masks reaching the array border: border surfaces must match too
    ref = _random_labels(rng, shape, touch)
    pred = _random_labels(rng, shape, touch) if seed % 3 else np.roll(ref, 1, axis=seed % 3)
    ref, pred = np.asarray(ref, order=order), np.asarray(pred, order=order)
    _assert_same(score_arrays(pred, ref, spacing), reference_score_arrays(pred, ref, spacing))


def test_mask_filling_the_whole_array_matches_reference():
    ref = np.ones((6, 7, 8), np.uint8)
    pred = ref.copy()
    pred[0] = 0
    pred[2:4, 2:4, 2:4] = 2
    spacing = (2.0, 0.7, 0.7)
    _assert_same(score_arrays(pred, ref, spacing), reference_score_arrays(pred, ref, spacing))


def test_fine_spacing_falls_back_to_the_package_and_matches_reference():
    # tolerance / spacing ~ 10 voxels: thousands of offsets, so the package runs on the crop
    spacing = (0.1, 0.12, 0.11)
    assert len(surface._offsets_within(spacing, SD_TOLERANCE_MM["kidney"])) > surface._MAX_OFFSETS
    rng = np.random.default_rng(7)
    ref = _random_labels(rng, (30, 32, 34), touch_border=True)
    pred = _random_labels(rng, (30, 32, 34), touch_border=False)
    pred = np.asfortranarray(pred)
    _assert_same(score_arrays(pred, ref, spacing), reference_score_arrays(pred, ref, spacing))


@pytest.mark.parametrize(
    "spacing", [(1.0, 0.855469, 0.855469), (5.0, 0.683594, 0.683594), (0.5, 0.703125, 0.703125)]
)
def test_tolerance_offsets_are_exactly_scipy_edt_decisions(spacing):
    """The neighbour offsets kept are exactly the voxels scipy's EDT puts within tolerance."""
    spacing = tuple(float(np.float32(s)) for s in spacing)  # header zooms are float32
    for tol in SD_TOLERANCE_MM.values():
        offsets = surface._offsets_within(spacing, tol)
        r = 6
        grid = np.ones((2 * r + 1,) * 3, bool)
        grid[r, r, r] = False  # single feature at the centre
        dist = scipy.ndimage.distance_transform_edt(grid, sampling=spacing)
        expected = {tuple(int(v) for v in idx - r) for idx in np.argwhere(dist <= tol)}
        assert {tuple(int(v) for v in o) for o in offsets} == expected


def test_surface_distance_package_runs_on_numpy2_empty_masks_without_warnings():
    import surface_distance

    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[2, 2, 2] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deprecated scipy namespaces would warn here
        dist = surface_distance.compute_surface_distances(empty, full, (1.0, 1.0, 1.0))
        assert np.isinf(dist["distances_pred_to_gt"]).all()
        assert surface_distance.compute_surface_dice_at_tolerance(dist, 1.0) == 0.0
        dist = surface_distance.compute_surface_distances(full, full, (1.0, 1.0, 1.0))
        assert surface_distance.compute_surface_dice_at_tolerance(dist, 1.0) == 1.0
    if int(np.__version__.split(".")[0]) >= 2:
        assert not hasattr(np, "Inf"), "the compat shim must not modify numpy itself"


# ------------------------------------------------------------------ errors name case and file


def test_shape_mismatch_names_case_and_files(tmp_path):
    p = _write(tmp_path / "p.nii.gz", np.zeros((4, 5, 6), np.uint8))
    r = _write(tmp_path / "r.nii.gz", np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(KitsnetError, match="case_00042") as err:
        score_case("case_00042", p, r)
    assert str(p) in str(err.value) and str(r) in str(err.value) and "shape" in str(err.value)


def test_spacing_mismatch_names_case_and_files(tmp_path):
    p = _write(tmp_path / "p.nii.gz", np.zeros((4, 5, 6), np.uint8), (1.0, 0.8, 0.8))
    r = _write(tmp_path / "r.nii.gz", np.zeros((4, 5, 6), np.uint8), (2.5, 0.8, 0.8))
    with pytest.raises(KitsnetError, match="case_00042") as err:
        score_case("case_00042", p, r)
    assert str(p) in str(err.value) and str(r) in str(err.value) and "spacing" in str(err.value)


@pytest.mark.parametrize("where", ["prediction", "reference"])
@pytest.mark.parametrize("bad, dtype", [(5, np.uint8), (-1, np.int16), (4, np.int32)])
def test_label_outside_0_3_names_case_and_file(tmp_path, where, bad, dtype):
    good = _cube((6, 6, 6), (1, 1, 1), (4, 4, 4), label=1, dtype=dtype)
    wrong = good.copy()
    wrong[2, 2, 2] = bad
    p = _write(tmp_path / "p.nii.gz", wrong if where == "prediction" else good)
    r = _write(tmp_path / "r.nii.gz", wrong if where == "reference" else good)
    with pytest.raises(KitsnetError, match=f"label {bad} outside 0-3") as err:
        score_case("case_00042", p, r)
    assert "case_00042" in str(err.value)
    assert str(p if where == "prediction" else r) in str(err.value)


def test_label_outside_0_3_in_arrays_is_refused():
    seg = np.zeros((4, 4, 4), np.uint8)
    bad = seg.copy()
    bad[1, 1, 1] = 5
    with pytest.raises(KitsnetError, match="label 5"):
        score_arrays(bad, seg, (1, 1, 1))


def test_non_integer_float_labels_are_refused(tmp_path):
    seg = np.zeros((4, 4, 4), np.float32)
    bad = seg.copy()
    bad[1, 1, 1] = 1.5
    with pytest.raises(KitsnetError, match="non-integer"):
        score_arrays(bad, seg, (1, 1, 1))
    p = _write(tmp_path / "p.nii.gz", seg + (bad > 0) * 2)  # float labels 0/2 are fine
    r = _write(tmp_path / "r.nii.gz", seg + (bad > 0) * 2)
    assert score_case("c", p, r)["dice_tumor"] == 1.0


def test_missing_file_names_case_and_file(tmp_path):
    r = _write(tmp_path / "r.nii.gz", np.zeros((4, 4, 4), np.uint8))
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(KitsnetError, match="missing") as err:
        score_case("case_00042", missing, r)
    assert "case_00042" in str(err.value) and str(missing) in str(err.value)


def test_unreadable_file_names_case_and_file(tmp_path):
    p = _write(tmp_path / "p.nii.gz", np.zeros((4, 4, 4), np.uint8))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a nifti file")
    with pytest.raises(KitsnetError, match="unreadable") as err:
        score_case("case_00042", p, broken)
    assert "case_00042" in str(err.value) and str(broken) in str(err.value)


# ------------------------------------------------------------------ pairing, CSV, CLI


def test_pair_folder_pairs_flat_and_kits_layouts(tmp_path):
    seg = np.zeros((4, 4, 4), np.uint8)
    for case in ("case_00002", "case_00001"):
        _write(tmp_path / "pred" / f"{case}.nii.gz", seg)
        _write(tmp_path / "flat" / f"{case}.nii.gz", seg)
        _write(tmp_path / "kits" / case / "aggregated_MAJ_seg.nii.gz", seg)
    _write(tmp_path / "kits" / "case_00003" / "aggregated_MAJ_seg.nii.gz", seg)  # not predicted
    (tmp_path / "pred" / ".case_00001.tmp123.nii.gz").write_bytes(b"")  # atomic_path temp
    (tmp_path / "pred" / "notes.txt").write_text("ignored")

    flat = pair_folder(tmp_path / "pred", tmp_path / "flat")
    assert [c for c, _, _ in flat] == ["case_00001", "case_00002"]
    assert flat[0][2] == tmp_path / "flat" / "case_00001.nii.gz"
    kits = pair_folder(tmp_path / "pred", tmp_path / "kits")
    assert [c for c, _, _ in kits] == ["case_00001", "case_00002"]
    assert kits[1][2] == tmp_path / "kits" / "case_00002" / "aggregated_MAJ_seg.nii.gz"


def test_pair_folder_missing_reference_names_case_and_file(tmp_path):
    seg = np.zeros((4, 4, 4), np.uint8)
    _write(tmp_path / "pred" / "case_00001.nii.gz", seg)
    (tmp_path / "ref").mkdir()
    with pytest.raises(KitsnetError, match="case_00001") as err:
        pair_folder(tmp_path / "pred", tmp_path / "ref")
    assert str(tmp_path / "ref" / "case_00001.nii.gz") in str(err.value)


def test_pair_folder_missing_prediction_names_case_and_file(tmp_path):
    seg = np.zeros((4, 4, 4), np.uint8)
    _write(tmp_path / "pred" / "case_00001.nii.gz", seg)
    _write(tmp_path / "ref" / "case_00001.nii.gz", seg)
    _write(tmp_path / "ref" / "case_00009.nii.gz", seg)
    with pytest.raises(KitsnetError, match="case_00009") as err:
        pair_folder(tmp_path / "pred", tmp_path / "ref")
    assert str(tmp_path / "pred" / "case_00009.nii.gz") in str(err.value)


def test_pair_folder_without_predictions_is_an_error(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    with pytest.raises(KitsnetError, match="no <case>.nii.gz predictions"):
        pair_folder(tmp_path / "pred", tmp_path / "ref")


def test_write_scores_keeps_full_float_precision(tmp_path):
    df = pd.DataFrame(
        [{"case": "case_00001", **dict.fromkeys(METRIC_COLUMNS, 0.1 + 0.2)}],
        columns=["case", *METRIC_COLUMNS],
    )
    df.loc[0, "sd_tumor"] = 1 / 3
    out = tmp_path / "sub" / "scores.csv"
    write_scores(df, out)
    back = _read_scores(out)
    assert list(back.columns) == ["case", *METRIC_COLUMNS]
    assert back.loc[0, "dice_kidney"] == 0.1 + 0.2 and back.loc[0, "sd_tumor"] == 1 / 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.csv"]  # no temp left


def _small_case_folders(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    for i in range(3):
        ref = _random_labels(rng, (20, 22, 24), touch_border=False)
        pred = np.roll(ref, i, axis=1)
        _write(tmp_path / "ref" / f"case_0000{i}.nii.gz", ref, (2.0, 0.8, 0.8))
        _write(tmp_path / "pred" / f"case_0000{i}.nii.gz", pred, (2.0, 0.8, 0.8))
    return tmp_path / "pred", tmp_path / "ref"


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kitsnet")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_evaluate_writes_one_row_per_case_and_prints_means(tmp_path, capsys):
    pred_dir, ref_dir = _small_case_folders(tmp_path)
    out = tmp_path / "scores.csv"
    argv = ["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "--out", str(out)]
    assert _run_cli([*argv, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    df = _read_scores(out)
    assert list(df.columns) == ["case", *METRIC_COLUMNS]
    assert list(df["case"]) == ["case_00000", "case_00001", "case_00002"]
    for col in METRIC_COLUMNS:
        assert f"mean {col}" in printed
        assert f"{df[col].mean():.8f}" in printed
    assert (df.loc[0, METRIC_COLUMNS] == 1.0).all()  # case_00000 is its own reference
    serial = evaluate_pairs(pair_folder(pred_dir, ref_dir), jobs=1)
    pd.testing.assert_frame_equal(serial, df, check_exact=True)


def test_cli_default_jobs_is_all_cores():
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--pred-dir", "p", "--ref-dir", "r", "--out", "o.csv"])
    assert args.jobs == (os.cpu_count() or 1)


def test_evaluate_pairs_reports_the_failing_case_from_a_worker(tmp_path):
    pred_dir, ref_dir = _small_case_folders(tmp_path)
    pairs = pair_folder(pred_dir, ref_dir)
    pairs[1] = (pairs[1][0], tmp_path / "gone.nii.gz", pairs[1][2])
    with pytest.raises(KitsnetError, match="case_00001.*gone.nii.gz"):
        evaluate_pairs(pairs, jobs=2)


# ------------------------------------------------------------------ real KiTS21 label maps


@needs_data
def test_every_real_pair_is_covered():
    found = sorted(f"{c}_{a}" for c, aggs in MAPS.items() for a in aggs)
    expected = sorted(f"{c}_{a}" for c in CASES for a in ["MAJ", *AGGREGATIONS])
    assert found == expected


@pytest.fixture(scope="module")
def real_scores(tmp_path_factory) -> dict[str, tuple[pd.DataFrame, dict[str, dict]]]:
    """``kitsnet evaluate`` (via the CLI) and the literal reference on all 24 real pairs.

    Predictions and references are linked into the layouts the CLI expects (flat prediction
    folders, KiTS21 case folders for the reference); the files themselves are never copied.
    """
    if not MAPS:
        pytest.skip(NO_MAPS)
    root = tmp_path_factory.mktemp("kits21_real")
    for case in CASES:
        ref_link = root / "ref" / case / "aggregated_MAJ_seg.nii.gz"
        ref_link.parent.mkdir(parents=True)
        ref_link.symlink_to(_map(case, "MAJ"))
        for agg in AGGREGATIONS:
            (root / agg).mkdir(exist_ok=True)
            (root / agg / f"{case}.nii.gz").symlink_to(_map(case, agg))

    jobs = os.cpu_count() or 1
    fast = {}
    for agg in AGGREGATIONS:
        out = root / f"scores_{agg}.csv"
        argv = ["evaluate", "--pred-dir", str(root / agg), "--ref-dir", str(root / "ref")]
        assert _run_cli([*argv, "--out", str(out), "--jobs", str(jobs)]) == 0
        fast[agg] = _read_scores(out).set_index("case")

    names, preds, refs = [], [], []
    for case in CASES:
        for agg in AGGREGATIONS:
            names.append(f"{case}_{agg}")
            preds.append(_map(case, agg))
            refs.append(_map(case, "MAJ"))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        reference = {row["case"]: row for row in pool.map(reference_score_case, names, preds, refs)}
    return {agg: (fast[agg], reference) for agg in AGGREGATIONS}


@needs_data
@pytest.mark.slow  # the official whole-volume computation of 24 real pairs: minutes
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("case", CASES)
def test_kitsnet_evaluate_equals_official_definition_on_real_pair(real_scores, case, agg):
    fast, reference = real_scores[agg]
    assert list(fast.columns) == METRIC_COLUMNS
    assert sorted(fast.index) == CASES
    ours = fast.loc[case].to_dict()
    ref = reference[f"{case}_{agg}"]
    _assert_same(ours, ref)
    assert all(0.5 < ours[c] <= 1.0 for c in METRIC_COLUMNS)  # realistic, imperfect
    assert any(ours[c] < 1.0 for c in METRIC_COLUMNS)


@pytest.fixture(scope="module")
def case_00287() -> tuple[np.ndarray, tuple[float, float, float]]:
    if not MAPS:
        pytest.skip(NO_MAPS)
    from kitsnet.core.io import load_volume

    vol = load_volume(_map("case_00287", "MAJ"))
    assert set(np.unique(vol.array)) == {0, 1, 2, 3}
    return vol.array, vol.spacing


@needs_data
@pytest.mark.parametrize(
    "variant, expected",
    [
        # prediction misses every tumor (relabelled kidney): tumor is empty in one -> 0, 0
        ("pred_without_tumor", {"dice_tumor": 0.0, "sd_tumor": 0.0}),
        # no tumor in either: tumor empty in both -> 1, 1; masses are the cysts alone
        ("both_without_tumor", {"dice_tumor": 1.0, "sd_tumor": 1.0}),
        # prediction keeps only kidney: masses and tumor empty in one -> 0, 0
        ("pred_kidney_only", {"dice_masses": 0.0, "sd_masses": 0.0, "dice_tumor": 0.0}),
        # a cyst-free case (like 6 of the 12): masses == tumor in both
        ("both_without_cyst", {}),
    ],
)
def test_empty_classes_on_real_case_follow_kits21_rules(case_00287, variant, expected):
    ref, spacing = case_00287
    pred = np.asfortranarray(np.roll(ref, 1, axis=2))  # realistic imperfect prediction
    if variant == "pred_without_tumor":
        pred = np.where(pred == 2, 1, pred).astype(np.uint8)
    elif variant == "both_without_tumor":
        pred = np.where(pred == 2, 1, pred).astype(np.uint8)
        ref = np.where(ref == 2, 1, ref).astype(np.uint8)
    elif variant == "pred_kidney_only":
        pred = (pred > 0).astype(np.uint8)
    elif variant == "both_without_cyst":
        pred = np.where(pred == 3, 1, pred).astype(np.uint8)
        ref = np.where(ref == 3, 1, ref).astype(np.uint8)
    ours = score_arrays(pred, ref, spacing)
    _assert_same(ours, reference_score_arrays(pred, ref, spacing))
    for col, value in expected.items():
        assert ours[col] == value, col
    if variant == "both_without_cyst":
        assert ours["dice_masses"] == ours["dice_tumor"]


@needs_data
def test_nibabel_axis_order_matches_official_simpleitk_reading():
    """The official code reads with SimpleITK and reverses GetSpacing(); our nibabel arrays with
    header zooms in the same order must give the same numbers."""
    sitk = pytest.importorskip("SimpleITK")
    pred_path, ref_path = _map("case_00287", "OR"), _map("case_00287", "MAJ")
    img_pred, img_ref = sitk.ReadImage(str(pred_path)), sitk.ReadImage(str(ref_path))
    spacing = list(img_pred.GetSpacing())[::-1]
    official = reference_score_arrays(
        sitk.GetArrayFromImage(img_pred), sitk.GetArrayFromImage(img_ref), tuple(spacing)
    )
    ours = score_case("case_00287", pred_path, ref_path)
    _assert_same(ours, official)
    assert not math.isnan(ours["sd_kidney"])


@needs_data
def test_int32_label_maps_as_stored_by_kits21_give_identical_scores(case_00287):
    """KiTS21 stores its segmentations as int32; dtype and memory order must not matter."""
    ref, spacing = case_00287
    pred = np.roll(ref, -1, axis=1)
    base = score_arrays(pred, ref, spacing)
    as_int32 = score_arrays(
        np.asfortranarray(pred, dtype=np.int32), np.ascontiguousarray(ref, dtype=np.int32), spacing
    )
    assert as_int32 == base
