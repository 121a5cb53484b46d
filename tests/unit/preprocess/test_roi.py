"""3d_cascade_roi: the region of interest the first stage defines (kitsnet.preprocess.roi), the
crops the
loader samples from, and the paste-back of a prediction onto the whole grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kitsnet.core.io import KitsnetError
from kitsnet.predict.infer import logits_to_original, predict_fold
from kitsnet.preprocess.roi import (
    OUTSIDE_LOGIT,
    Box,
    case_items,
    crop_case,
    foreground_boxes,
    margin_voxels,
    merge_overlapping,
    paste_logits,
    region_boxes,
)
from kitsnet.train.loader import CaseStore, PatchSampler
from kitsnet.train.loop import train_fold

REAL_CASES = ["case_00003", "case_00057", "case_00160", "case_00268"]  # 1-5 components, 0.5-3 mm
ROI = {"margin_mm": 20.0, "boxes": "single"}


def _fg_extent(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(seg > 0)
    return idx.min(0), idx.max(0) + 1


def _inside(box: Box, points: np.ndarray) -> np.ndarray:
    return np.all((points >= box.start) & (points < box.stop), axis=1)


@pytest.fixture(scope="module", params=REAL_CASES)
def real_map(request, kits21_label_maps):
    """A real KiTS21 label map standing in for the first stage's segmentation, with its
    spacing (the box arithmetic is the same on any grid)."""
    import nibabel as nib

    if request.param not in kits21_label_maps:
        pytest.skip(f"{request.param} is not among the label maps $KITSNET_KITS21_LABELS holds")
    path = kits21_label_maps[request.param]["MAJ"]
    img = nib.load(path)
    return request.param, np.asarray(img.dataobj).astype(np.uint8), img.header.get_zooms()


def test_box_on_real_label_maps_holds_every_kidney_and_mass_voxel_plus_the_margin(real_map):
    case, seg, spacing = real_map
    (box,), fallback = region_boxes(seg, list(spacing), ROI, case, log=lambda *_: None)
    assert not fallback
    margin = margin_voxels(20.0, spacing)
    assert all(m * s >= 20.0 for m, s in zip(margin, spacing, strict=True))  # never short
    lo, hi = _fg_extent(seg)
    for axis, n in enumerate(seg.shape):
        # exactly the margin around the foreground, unless the image ends first
        assert box.start[axis] == max(0, lo[axis] - margin[axis])
        assert box.stop[axis] == min(n, hi[axis] + margin[axis])
        assert 0 <= box.start[axis] < box.stop[axis] <= n
    outside = seg.copy()
    outside[box.slices] = 0
    assert not outside.any()
    assert np.prod(box.shape) < seg.size  # a real crop


def test_a_box_reaching_past_the_image_is_clipped_to_it():
    seg = np.zeros((10, 30, 30), np.uint8)
    seg[0:4, 25:30, 2:5] = 1  # touches three borders
    (box,) = foreground_boxes(seg, (3, 3, 3))
    assert box == Box((0, 22, 0), (7, 30, 8))


def test_per_kidney_boxes_on_real_label_maps_cover_every_voxel_without_overlapping(real_map):
    case, seg, spacing = real_map
    roi = dict(ROI, boxes="per_kidney")
    boxes, _ = region_boxes(seg, list(spacing), roi, case, log=lambda *_: None)
    (single,), _ = region_boxes(seg, list(spacing), ROI, case, log=lambda *_: None)
    assert 1 <= len(boxes) <= 2  # two kidneys (or one box where their margins meet)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    fg = np.argwhere(seg > 0)
    assert np.all(np.any([_inside(b, fg) for b in boxes], axis=0))
    for b in boxes:  # each within the single box, none bigger than it
        assert all(s0 <= s1 for s0, s1 in zip(single.start, b.start, strict=True))
        assert all(e1 <= e0 for e0, e1 in zip(single.stop, b.stop, strict=True))
    assert sum(np.prod(b.shape) for b in boxes) <= np.prod(single.shape)


def test_per_kidney_gives_one_box_per_kidney_and_one_box_around_both_by_default():
    seg = np.zeros((20, 40, 80), np.uint8)
    seg[5:15, 10:30, 5:20] = 1  # left kidney
    seg[6:14, 12:28, 60:75] = 1  # right kidney, with a tumour
    seg[8:10, 15:18, 62:65] = 2
    left, right = foreground_boxes(seg, (2, 2, 2), "per_kidney")
    assert left == Box((3, 8, 3), (17, 32, 22)) and right == Box((4, 10, 58), (16, 30, 77))
    (both,) = foreground_boxes(seg, (2, 2, 2), "single")
    assert both == left.union(right)
    # margins that meet: the two boxes overlap and are merged into one
    (merged,) = foreground_boxes(seg, (25, 25, 25), "per_kidney")
    assert merged == Box((0, 0, 0), seg.shape)


def test_merging_repeats_until_no_boxes_overlap():
    a, b, c = Box((0, 0, 0), (4, 4, 4)), Box((10, 0, 0), (14, 4, 4)), Box((3, 0, 0), (11, 2, 2))
    # c overlaps a and b: one box; touching boxes stay apart
    assert merge_overlapping([a, b, c]) == [Box((0, 0, 0), (14, 4, 4))]
    d = Box((4, 0, 0), (6, 4, 4))
    assert merge_overlapping([d, a]) == [a, d]


def test_an_empty_first_stage_falls_back_to_the_whole_volume_and_logs_the_case():
    messages = []
    boxes, fallback = region_boxes(
        np.zeros((6, 7, 8), np.uint8), [1.0, 1.0, 1.0], ROI, "case_00042", log=messages.append
    )
    assert fallback and boxes == [Box((0, 0, 0), (6, 7, 8))]
    assert len(messages) == 1 and "case_00042" in messages[0] and "whole volume" in messages[0]


def test_pasted_prediction_is_on_the_original_grid_and_background_outside_the_box():
    # fullres grid 1 mm; original grid 2.5 x 0.8 x 0.8 mm (anisotropic: slice-wise export)
    full_shape, box = (40, 50, 50), Box((10, 12, 20), (30, 32, 36))
    part = np.full((4, *box.shape), -5.0, np.float32)
    part[1] = 5.0  # the network says "kidney" everywhere in the box, up to its border
    logits = paste_logits([part], [box], full_shape)
    assert logits.shape == (4, *full_shape)
    assert (logits[0] == 0).sum() == np.prod(full_shape) - np.prod(box.shape)
    assert (logits[1:] == OUTSIDE_LOGIT).sum() == 3 * (np.prod(full_shape) - np.prod(box.shape))
    original = [2.5, 0.8, 0.8]
    shape = [16, 62, 62]  # 40 / 2.5, 50 / 0.8
    geometry = {"original_shape": shape, "original_spacing": original}
    plan = {"spacing": [1.0, 1.0, 1.0], "anisotropy_threshold": 3.0}
    seg = logits_to_original(logits, geometry, plan)
    assert list(seg.shape) == shape and set(np.unique(seg)) == {0, 1}
    # every original voxel whose centre lies in the box is kidney (one fullres voxel of
    # interpolation at the border aside), every one outside is background
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, original, strict=True)]
    grids = np.meshgrid(*centres, indexing="ij")
    inside = np.ones(shape, bool)
    core = np.ones(shape, bool)
    for g, a, b in zip(grids, box.start, box.stop, strict=True):
        inside &= (g >= a) & (g <= b)
        core &= (g >= a + 1) & (g <= b - 1)
    assert not seg[~inside].any()
    assert seg[core].all()


def _fullres_case(root, case: str, shape=(20, 28, 28), fg: bool = True) -> dict:
    """One preprocessed fullres case (1 mm, the original grid itself) and a first stage."""
    rng = np.random.default_rng(int(case[-1]))
    seg = np.zeros(shape, np.uint8)
    seg[6:14, 8:20, 6:12] = 1
    seg[8:11, 10:14, 7:10] = 2
    img = (seg * 2.0 + rng.normal(0, 0.3, shape)).astype(np.float32)[None]
    prev = seg.copy() if fg else np.zeros(shape, np.uint8)
    files = {
        "image": root / f"{case}_image.npy",
        "seg": root / f"{case}_seg.npy",
        "props": root / f"{case}.json",
        "prev": root / f"{case}_first_stage.npy",
    }
    np.save(files["image"], img)
    np.save(files["seg"], seg)
    np.save(files["prev"], prev)
    props = {
        "case": case,
        "shape": list(shape),
        "spacing": [1.0, 1.0, 1.0],
        "original_shape": list(shape),
        "original_spacing": [1.0, 1.0, 1.0],
        "affine": np.diag([-1.0, -1.0, 1.0, 1.0]).tolist(),
        "sform_code": 2,
        "qform_code": 0,
        "class_locations": {},
    }
    files["props"].write_text(json.dumps(props))
    return files


def _crop(files: dict, case: str, out, roi=None, log=lambda *_: None):
    plan = {"configuration": "3d_cascade_roi", "roi": roi or {"margin_mm": 3.0, "boxes": "single"}}
    return crop_case(
        case, files["image"], files["seg"], files["props"], files["prev"], plan, out, log=log
    )


def test_crop_writes_one_item_per_box_with_its_previous_stage_and_a_manifest(tmp_path):
    (tmp_path / "full").mkdir()
    files = _fullres_case(tmp_path / "full", "case_00001")
    out = tmp_path / "roi" / "case_00001"
    (box,) = _crop(files, "case_00001", out)
    assert box == Box((3, 5, 3), (17, 23, 15))
    assert case_items(tmp_path / "roi", "case_00001") == ["case_00001/box0"]
    image = np.load(out / "box0_image.npy")
    assert image.shape == (1, *box.shape) and image.dtype == np.float32
    np.testing.assert_array_equal(image, np.load(files["image"])[(slice(None), *box.slices)])
    np.testing.assert_array_equal(
        np.load(out / "box0_prev.npy"), np.load(files["prev"])[box.slices]
    )
    item = json.loads((out / "box0.json").read_text())
    locs = np.array(item["class_locations"]["2"])
    crop_seg = np.load(out / "box0_seg.npy")
    assert len(locs) and np.all(crop_seg[tuple(locs.T)] == 2)  # in crop coordinates
    manifest = json.loads((out / "roi.json").read_text())
    assert manifest["boxes"] == [box.to_json()] and manifest["fallback"] is False
    assert manifest["original_shape"] == [20, 28, 28] and manifest["shape"] == [20, 28, 28]


def test_crop_of_an_empty_first_stage_keeps_the_whole_case_and_says_so(tmp_path):
    (tmp_path / "full").mkdir()
    files = _fullres_case(tmp_path / "full", "case_00002", fg=False)
    messages = []
    (box,) = _crop(files, "case_00002", tmp_path / "roi" / "case_00002", log=messages.append)
    assert box == Box((0, 0, 0), (20, 28, 28))
    assert any("case_00002" in m and "whole volume" in m for m in messages)
    manifest = json.loads((tmp_path / "roi" / "case_00002" / "roi.json").read_text())
    assert manifest["fallback"] is True


def test_crop_of_arrays_on_different_grids_names_the_case_and_the_files(tmp_path):
    (tmp_path / "full").mkdir()
    files = _fullres_case(tmp_path / "full", "case_00003")
    np.save(files["prev"], np.zeros((10, 14, 14), np.uint8))
    with pytest.raises(KitsnetError, match=r"case_00003: .*first stage .*case_00003_first_stage"):
        _crop(files, "case_00003", tmp_path / "roi" / "case_00003")


def test_the_loader_draws_a_case_first_then_one_of_its_boxes(tmp_path):
    """Two items of one case do not make that case twice as likely (nnU-Net samples cases)."""
    (tmp_path / "full").mkdir()
    roi = tmp_path / "roi"
    for case in ("case_00001", "case_00002"):
        files = _fullres_case(tmp_path / "full", case)
        if case == "case_00002":  # two kidneys, far apart: two boxes
            seg = np.load(files["prev"])
            seg[6:14, 8:20, 20:26] = 1
            np.save(files["prev"], seg)
        _crop(files, case, roi / case, roi={"margin_mm": 2.0, "boxes": "per_kidney"})
    store = CaseStore(["case_00001", "case_00002"], roi, cropped=True)
    assert store.groups == [["case_00001/box0"], ["case_00002/box0", "case_00002/box1"]]
    assert store.prev["case_00002/box1"].shape == store.seg["case_00002/box1"].shape
    sampler = PatchSampler(store, [16] * 3, [16] * 3, 3, 0.33, np.random.default_rng(0))
    draws = [sampler.draw_case() for _ in range(2000)]
    assert 0.45 < draws.count("case_00001/box0") / len(draws) < 0.55


ARCH = {
    "dim": 3,
    "features_per_stage": [4, 8],
    "strides": [[1, 1, 1], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 2,
    "n_conv_per_stage": 1,
    "n_conv_per_stage_decoder": 1,
    "deep_supervision": True,
}
TRAINING = {
    "epochs": 2,
    "iterations_per_epoch": 2,
    "val_iterations": 1,
    "initial_lr": 0.01,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 3e-5,
    "poly_exponent": 0.9,
    "grad_clip": 12.0,
    "oversample_foreground": 0.5,
    "ema_alpha": 0.9,
    "checkpoint_every": 1,
}


def _roi_plan() -> dict:
    return {
        "configuration": "3d_cascade_roi",
        "previous_stage": "3d_lowres",
        "arch": ARCH,
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "num_classes": 4,
        "in_channels": 4,
        "spacing": [1.0, 1.0, 1.0],
        "anisotropy_threshold": 3.0,
        "roi": {"margin_mm": 3.0, "boxes": "single"},
    }


def _cropped_cases(tmp_path, n: int = 4) -> list[str]:
    (tmp_path / "full").mkdir()
    cases = [f"case_0000{i}" for i in range(n)]
    for case in cases:
        _crop(_fullres_case(tmp_path / "full", case), case, tmp_path / "roi" / case)
    return cases


def test_cropped_batches_carry_the_previous_stage_and_do_not_depend_on_the_workers(tmp_path):
    import yaml

    from kitsnet.train.pipeline import InputPipeline, batches, epoch_keys

    cases = _cropped_cases(tmp_path)
    aug = yaml.safe_load(open("config/config.yaml"))["augmentation"]
    split = {"train": cases[1:], "val": cases[:1]}
    keys = epoch_keys(0, 0, 3, 1)
    runs = []
    for workers in (0, 1):
        pipe = InputPipeline(_roi_plan(), TRAINING, aug, split, tmp_path / "roi", seed=2, fold=0)
        runs.append(list(batches(pipe, keys, workers)))
    for a, b in zip(*runs, strict=True):
        assert a["image"].shape == (2, 4, 16, 16, 16)  # image + 3 one-hot previous-stage channels
        assert torch.equal(a["image"], b["image"])
        assert all(torch.equal(x, y) for x, y in zip(a["targets"], b["targets"], strict=True))


def test_roi_configuration_trains_on_crops_and_predicts_pasted_back(tmp_path, one_torch_thread):
    """train_fold and predict_fold of a ROI plan through kitsnet's functions on tiny cases:
    the crops (smaller than the patch on one axis: padded) with their previous stage and the
    cascade's augmentation; the prediction on the original grid, background outside the box."""
    import nibabel as nib
    import yaml

    cases = _cropped_cases(tmp_path)
    plan = _roi_plan()
    aug = yaml.safe_load(open("config/config.yaml"))["augmentation"]  # cascade_* included
    splits = [{"train": cases[1:], "val": cases[:1]}]
    torch.manual_seed(0)
    model = tmp_path / "model"
    train_fold(plan, splits, 0, tmp_path / "roi", model, TRAINING, aug, seed=1, log=lambda *_: None)
    inference = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": False}
    messages = []
    predict_fold(
        model / "model_final.pt",
        cases[:1],
        tmp_path / "roi",
        tmp_path / "pred",
        inference,
        device="cpu",
        log=messages.append,
    )
    pred = nib.load(tmp_path / "pred" / "case_00000.nii.gz")
    labels = np.asarray(pred.dataobj)
    assert labels.shape == (20, 28, 28)
    box = Box((3, 5, 3), (17, 23, 15))
    outside = labels.copy()
    outside[box.slices] = 0
    assert not outside.any()
    assert messages == ["predicted case_00000"]


def test_kitsnet_predict_of_the_roi_configuration_keeps_to_the_first_stages_region(
    tmp_path, monkeypatch, one_torch_thread
):
    """``kitsnet predict --config 3d_cascade_roi`` on a new scan: the lowres ensemble runs, its
    segmentation (here pinned to one kidney-sized block) decides the box, and the fullres
    stage's labels on the original grid are background outside that box."""
    import nibabel as nib

    import kitsnet.predict.images as images
    from kitsnet.data.synth import kits_affine
    from kitsnet.model.checkpoint import save_torch
    from kitsnet.model.network import build_network

    norm = {"scheme": "CT", "clip": [-100.0, 300.0], "mean": 100.0, "std": 80.0}
    common = {"num_classes": 4, "anisotropy_threshold": 3.0, "normalization": norm}
    arch = {**ARCH, "deep_supervision": False}
    plans = {
        "3d_lowres": {**common, "spacing": [4.0] * 3, "patch_size": [8] * 3, "in_channels": 1},
        "3d_cascade_roi": {
            **common,
            "spacing": [2.0] * 3,
            "patch_size": [16] * 3,
            "in_channels": 4,
            "previous_stage": "3d_lowres",
            "roi": {"margin_mm": 4.0, "boxes": "single"},
        },
    }
    torch.manual_seed(0)
    for name, plan in plans.items():
        plan["arch"] = arch
        net = build_network(arch, plan["in_channels"], 4)
        if name == "3d_cascade_roi":  # says "kidney" everywhere it looks
            head = net.decoder.seg_layers[-1]
            torch.nn.init.zeros_(head.weight)
            head.bias.data = torch.tensor([0.0, 10.0, 0.0, 0.0])
        path = tmp_path / "models" / name / "fold_0" / "model_final.pt"
        path.parent.mkdir(parents=True)
        save_torch({"state_dict": net.state_dict(), "plan": json.dumps(plan)}, path)
    spacing = (3.0, 1.0, 1.0)
    ct = np.random.default_rng(0).normal(40, 50, (12, 40, 40)).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, kits_affine(spacing)), tmp_path / "new.nii.gz")
    block = (slice(6, 12), slice(6, 14), slice(4, 10))  # on the 2 mm grid (18 x 20 x 20)

    def first_stage(logits, shape, plan, spacing):
        seg = np.zeros(shape, np.uint8)
        seg[block] = 1
        return seg

    monkeypatch.setattr(images, "logits_to_next_stage", first_stage)
    (out,) = images.predict_images(
        tmp_path / "models",
        tmp_path / "new.nii.gz",
        tmp_path / "pred",
        "3d_cascade_roi",
        mirror=False,
        device="cpu",
    )
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.shape == (12, 40, 40)
    # the box on the 2 mm grid: the block + 2 voxels (4 mm); on the original grid, in mm
    box_mm = [((sl.start - 2) * 2.0, (sl.stop + 2) * 2.0) for sl in block]
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(labels.shape, spacing, strict=True)]
    inside, core = np.ones(labels.shape, bool), np.ones(labels.shape, bool)
    for axis, (lo, hi) in enumerate(box_mm):
        view = [1, 1, 1]
        view[axis] = -1
        c = centres[axis].reshape(view)
        inside = inside & (c >= lo - 2.0) & (c <= hi + 2.0)  # one 2 mm voxel of interpolation
        core = core & (c >= lo + 2.0) & (c <= hi - 2.0)
    assert not labels[~inside].any()
    assert core.any() and labels[core].all()  # kidney where the fullres stage looked
