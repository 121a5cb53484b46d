"""Fingerprint, plans and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from kitsnet.core.io import KitsnetError
from kitsnet.data.dataset import image_path, label_path
from kitsnet.plan.fingerprint import fingerprint
from kitsnet.plan.planner import auto_lowres_spacing, features_per_stage, make_plan
from kitsnet.plan.splits import load_or_make_splits, make_splits
from kitsnet.plan.topology import pool_and_conv_props
from kitsnet.stages import BASE_CONFIGURATIONS, CONFIGURATIONS


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
    # six stages: five down-samplings take 128 to 4 voxels (nnU-Net's topology rule)
    assert full["arch"]["features_per_stage"] == [30, 60, 120, 240, 320, 320]
    assert full["arch"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert full["arch"]["kernel_sizes"] == [[3, 3, 3]] * 6
    assert plans["3d_lowres"]["spacing"] == [1.99] * 3
    assert plans["3d_cascade_fullres"]["in_channels"] == 4
    assert plans["3d_cascade_fullres"]["data"] == "3d_fullres"
    # the ROI cascade: the cascade's plan (fullres patch, network, one-hot previous stage) plus
    # the region's settings
    roi = plans["3d_cascade_roi"]
    assert roi.pop("roi") == {"margin_mm": 20.0, "boxes": "single"}
    assert roi.pop("configuration") == "3d_cascade_roi"
    assert roi == {k: v for k, v in plans["3d_cascade_fullres"].items() if k != "configuration"}
    two = plans["2d"]
    assert two["arch"]["dim"] == 2 and two["batch_size"] == 12 and two["data"] == "2d"
    assert two["spacing"] == [0.78125] * 2  # in-plane; each case keeps its slice spacing
    assert two["arch"]["features_per_stage"] == [30, 60, 120, 240, 480, 480, 480, 480]
    # nnU-Net's planner: per-sample Dice for the lowres stage only
    assert {c: p["batch_dice"] for c, p in plans.items() if c in BASE_CONFIGURATIONS} == {
        "2d": True,
        "3d_fullres": True,
        "3d_lowres": False,
        "3d_cascade_fullres": True,
        "3d_cascade_roi": True,
    }


def test_region_based_plan_is_its_base_plan_with_nnunets_kits_regions(tiny_kits, repo):
    cases = sorted(p.name for p in tiny_kits.iterdir())
    fp = fingerprint([(c, image_path(tiny_kits, c), label_path(tiny_kits, c)) for c in cases])
    cfg = yaml.safe_load((repo / "config" / "kits21.yaml").read_text())
    for base in BASE_CONFIGURATIONS:
        plan, ref = make_plan(f"{base}_regions", fp, cfg), make_plan(base, fp, cfg)
        assert plan.pop("configuration") == f"{base}_regions"
        assert plan.pop("regions") == [[1, 2, 3], [2, 3], [2]]
        assert plan.pop("region_names") == ["kidney", "masses", "tumor"]
        assert plan.pop("regions_class_order") == [1, 3, 2]
        ref.pop("configuration")
        # same data, previous stage (the label-based lowres), network, batch Dice and ROI
        assert plan == ref


def test_auto_lowres_spacing_grows_until_patch_covers_a_quarter():
    sp = auto_lowres_spacing([1.0, 1.0, 1.0], [400, 400, 400], lambda _: 128**3)
    shape = 400 / np.array(sp)
    assert np.prod([128] * 3) >= 0.25 * np.prod(shape)
    assert np.prod([128] * 3) < 0.25 * np.prod(shape * 1.03)


def test_auto_lowres_spacing_grows_the_fine_axes_of_an_anisotropic_grid_first():
    sp = auto_lowres_spacing([3.0, 0.8, 0.8], [100, 300, 300], lambda _: 64 * 128 * 128)
    assert sp[0] == 3.0 and sp[1] == sp[2] > 0.8


def _fp(shape=(400, 512, 512), spacing=(0.78125, 0.78125, 0.78125)):
    fi = {"mean": 100.0, "std": 75.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}
    return {"shapes": [list(shape)], "spacings": [list(spacing)], "foreground_intensity": fi}


def test_depth_follows_the_patch_by_nnunets_rule(repo):
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    demo = {c: make_plan(c, _fp(), cfg)["arch"] for c in CONFIGURATIONS}
    assert len(demo["3d_fullres"]["strides"]) == 4  # 32 -> 4: three poolings
    assert len(demo["2d"]["strides"]) == 5  # 64 -> 4: four poolings
    cfg["plan"]["patch_size_3d"] = [48, 96, 80]  # 80 and 96 are not powers of two
    arch = make_plan("3d_fullres", _fp(), cfg)["arch"]
    assert arch["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert make_plan("3d_fullres", _fp(), cfg)["patch_size"] == [48, 96, 80]


def test_a_configured_depth_may_only_be_shallower_than_the_rule(repo):
    cfg = yaml.safe_load((repo / "config" / "kits21.yaml").read_text())
    cfg["plan"]["n_stages_3d"] = 4
    assert make_plan("3d_fullres", _fp(), cfg)["arch"]["features_per_stage"] == [30, 60, 120, 240]
    cfg["plan"]["n_stages_3d"] = 7
    with pytest.raises(KitsnetError, match="allows 2..6 stages"):
        make_plan("3d_fullres", _fp(), cfg)


def test_thick_slices_are_not_pooled_until_in_plane_catches_up():
    topo = pool_and_conv_props([5.0, 0.8, 0.8], [16, 256, 256])
    assert topo.strides[:4] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert topo.kernel_sizes[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert topo.kernel_sizes[-1] == [3, 3, 3]


@pytest.mark.parametrize(
    ("settings", "error"),
    [({"roi_margin_mm": -1.0}, "roi_margin_mm"), ({"roi_boxes": "per_organ"}, "roi_boxes")],
)
def test_roi_settings_come_from_the_plan_section_and_bad_ones_are_named(repo, settings, error):
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    cfg["plan"].update(roi_margin_mm=12.5, roi_boxes="per_kidney")
    assert make_plan("3d_cascade_roi", _fp(), cfg)["roi"] == {
        "margin_mm": 12.5,
        "boxes": "per_kidney",
    }
    assert "roi" not in make_plan("3d_cascade_fullres", _fp(), cfg)
    cfg["plan"].update(settings)
    with pytest.raises(KitsnetError, match=error):
        make_plan("3d_cascade_roi", _fp(), cfg)
