"""Fingerprint, plans and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from kitsnet.dataset import image_path, label_path
from kitsnet.io import KitsnetError
from kitsnet.plan import (
    CONFIGURATIONS,
    auto_lowres_spacing,
    features_per_stage,
    fingerprint,
    load_or_make_splits,
    make_plan,
    make_splits,
)


def test_splits_partition_the_cases_and_are_sorted():
    cases = [f"case_{i:05d}" for i in (7, 3, 11, 0, 5, 9, 1, 2, 4, 6, 8)]
    splits = make_splits(cases, 5, 12345)
    val = [c for s in splits for c in s["val"]]
    assert sorted(val) == sorted(cases) and len(val) == len(set(val))
    assert [len(s["val"]) for s in splits] == [3, 2, 2, 2, 2]  # first n % k folds one larger
    for s in splits:
        assert s["train"] == sorted(s["train"]) and s["val"] == sorted(s["val"])
        assert set(s["train"]) | set(s["val"]) == set(cases)


def test_splits_follow_sklearn_kfold_arithmetic():
    """Same shuffle as sklearn's KFold(shuffle=True, random_state=12345) on sorted ids."""
    cases = [f"case_{i:05d}" for i in range(12)]
    idx = np.arange(12)
    np.random.RandomState(12345).shuffle(idx)
    expected_first_val = sorted(cases[i] for i in idx[:3])
    assert make_splits(cases, 5, 12345)[0]["val"] == expected_first_val


def test_existing_splits_file_is_honoured_and_checked(tmp_path):
    cases = [f"case_{i:05d}" for i in range(6)]
    custom = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    f = tmp_path / "splits.json"
    f.write_text(json.dumps(custom))
    assert load_or_make_splits(cases, 2, 0, str(f)) == custom
    with pytest.raises(KitsnetError, match="folds"):
        load_or_make_splits(cases, 5, 0, str(f))


def test_features_double_from_base_to_cap():
    assert features_per_stage(30, 320, 5) == [30, 60, 120, 240, 320]
    assert features_per_stage(32, 480, 8)[-2:] == [480, 480]


def test_fingerprint_and_plans_of_tiny_dataset(tiny_kits, repo):
    cases = sorted(p.name for p in tiny_kits.iterdir())
    fp = fingerprint([(c, image_path(tiny_kits, c), label_path(tiny_kits, c)) for c in cases])
    fi = fp["foreground_intensity"]
    assert fi["percentile_00_5"] < fi["mean"] < fi["percentile_99_5"]
    assert len(fp["spacings"]) == len(cases)
    cfg = yaml.safe_load((repo / "config" / "kits21.yaml").read_text())
    plans = {c: make_plan(c, fp, cfg) for c in CONFIGURATIONS}
    full = plans["3d_fullres"]
    assert full["spacing"] == [0.78125] * 3 and full["patch_size"] == [128, 128, 128]
    assert full["arch"]["features_per_stage"] == [30, 60, 120, 240, 320]
    assert full["arch"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert plans["3d_lowres"]["spacing"] == [1.99] * 3
    assert plans["3d_cascade_fullres"]["in_channels"] == 4
    assert plans["3d_cascade_fullres"]["data"] == "3d_fullres"
    assert plans["2d"]["arch"]["dim"] == 2 and plans["2d"]["batch_size"] == 12


def test_auto_lowres_spacing_grows_until_patch_covers_a_quarter():
    fp = {"shapes": [[400, 400, 400]], "spacings": [[1.0, 1.0, 1.0]]}
    sp = auto_lowres_spacing(fp, [1.0, 1.0, 1.0], [128, 128, 128])
    shape = 400 / np.array(sp)
    assert np.prod([128] * 3) >= 0.25 * np.prod(shape)
    assert np.prod([128] * 3) < 0.25 * np.prod(shape * 1.03)
