"""Region-based training and export against nnU-Net v2's own region handling.

Needs the optional ``peer`` extra; skipped without it.  The reference is nnU-Net's KiTS recipe
(its Dataset220_KiTS2023 conversion): the label dict ``{"background": 0, "kidney": (1, 2, 3),
"masses": (2, 3), "tumor": 2}`` with ``regions_class_order`` (1, 3, 2), and for it

* ``LabelManager``: the foreground regions, their class order, the sigmoid
  (``apply_inference_nonlin``) and the painting of regions into labels
  (``convert_logits_to_segmentation`` / ``convert_probabilities_to_segmentation``);
* the trainer's targets (``nnUNetTrainer.get_validation_transforms``:
  ``ConvertSegmentationToRegionsTransform``, then ``DownsampleSegForDSTransform``) and its loss
  (``DC_and_BCE_loss`` with ``MemoryEfficientSoftDiceLoss``, ``do_bg=True``, smooth 1e-5, in
  ``DeepSupervisionWrapper`` with halving weights, the lowest output weighted 0);
* the export (``convert_predicted_logits_to_segmentation_with_correct_shape``: resample the
  logits linearly, sigmoid, paint) and ``export_prediction_from_logits(save_probabilities)``;
* the ensembling of ``nnUNetv2_ensemble`` (``average_probabilities``, then
  ``convert_probabilities_to_segmentation``).

nnU-Net cannot ensemble a softmax model with a region-based one; kitsnet's mixed ensemble is
checked against its definition (a softmax member's region probability is the sum of its
classes'), with nnU-Net's painting of the mean.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from batchgeneratorsv2.transforms.utils.seg_to_regions import (  # noqa: E402
    ConvertSegmentationToRegionsTransform,
)
from conftest import smooth_noise  # noqa: E402
from nnunetv2.ensembling.ensemble import average_probabilities  # noqa: E402
from nnunetv2.inference.export_prediction import (  # noqa: E402
    convert_predicted_logits_to_segmentation_with_correct_shape,
    export_prediction_from_logits,
)
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402

from kitsnet.core.regions import (  # noqa: E402
    REGION_NAMES,
    REGIONS,
    REGIONS_CLASS_ORDER,
    labels_to_regions,
    region_settings,
)
from kitsnet.core.resample import resample, resample_argmax  # noqa: E402
from kitsnet.predict.averaging import as_regions, average, ensemble_labels  # noqa: E402
from kitsnet.predict.probabilities import LEVELS, export_logits  # noqa: E402
from kitsnet.train.loss import deep_supervision_weights, region_targets, total_loss  # noqa: E402
from tests.reference.nnunet_plans import dataset_json, plans_manager  # noqa: E402

pytestmark = [pytest.mark.peer, pytest.mark.usefixtures("one_torch_thread")]

# nnU-Net's Dataset220_KiTS2023 dataset.json: the regions and the label each one paints
KITS_LABELS = {"background": 0, "kidney": (1, 2, 3), "masses": (2, 3), "tumor": 2}
KITS_CLASS_ORDER = (1, 3, 2)
# one float32 rounding of a sigmoid, and the float32 vs float64 resampling of the logits
EPS = 1e-5


def label_manager() -> LabelManager:
    return LabelManager(KITS_LABELS, list(KITS_CLASS_ORDER))


def region_dataset_json() -> dict:
    """dataset.json of the region-based KiTS dataset, as nnU-Net's export reads it."""
    return {**dataset_json(), "labels": KITS_LABELS, "regions_class_order": KITS_CLASS_ORDER}


def _as_tuple(region) -> tuple[int, ...]:
    """nnU-Net writes a one-label region as the bare label (``"tumor": 2``)."""
    return tuple(int(x) for x in region) if isinstance(region, tuple | list) else (int(region),)


# ---------------------------------------------------------------------------------------------
# labels -> regions


def test_regions_and_class_order_are_nnunets_label_manager_for_the_kits_label_dict():
    lm = label_manager()
    assert lm.has_regions and lm.num_segmentation_heads == len(REGIONS)
    assert [_as_tuple(r) for r in lm.foreground_regions] == [tuple(r) for r in REGIONS]
    assert tuple(lm.regions_class_order) == REGIONS_CLASS_ORDER
    # the plan's region entries (plain JSON lists) as a dataset.json label dict give the same
    settings = region_settings()
    names = dict(zip(settings["region_names"], settings["regions"], strict=True))
    from_plan = LabelManager({"background": 0, **names}, settings["regions_class_order"])
    assert [_as_tuple(r) for r in from_plan.foreground_regions] == [tuple(r) for r in REGIONS]
    assert tuple(settings["region_names"]) == REGION_NAMES == tuple(list(KITS_LABELS)[1:])


def test_labels_to_regions_and_region_targets_equal_nnunets_region_transform():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(2, 1, 11, 13, 9)).astype(np.int16)
    transform = ConvertSegmentationToRegionsTransform(label_manager().foreground_regions, 0)
    theirs = np.stack(
        [transform(segmentation=torch.from_numpy(s))["segmentation"].numpy() for s in labels]
    )
    assert theirs.dtype == bool and theirs.shape == (2, 3, 11, 13, 9)
    assert all(theirs[:, r].any() and not theirs[:, r].all() for r in range(3))
    for sample, expected in zip(labels, theirs, strict=True):
        ours = labels_to_regions(sample[0], REGIONS)
        assert ours.dtype == bool
        np.testing.assert_array_equal(ours, expected)
    targets = region_targets(torch.from_numpy(labels).long(), REGIONS)
    assert targets.dtype == torch.float32
    np.testing.assert_array_equal(targets.numpy(), theirs.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# the loss

SHAPES = [(24, 24, 24), (12, 12, 12), (6, 6, 6), (3, 3, 3)]


def _nnunet_region_loss(batch_dice: bool) -> torch.nn.Module:
    """nnUNetTrainer._build_loss for a label manager with regions (no ignore label, no DDP)."""
    dice_kwargs = {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False}
    loss = DC_and_BCE_loss(
        {}, dice_kwargs, use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss
    )
    weights = np.array([1 / 2**i for i in range(len(SHAPES))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _nnunet_region_targets(labels: torch.Tensor) -> list[torch.Tensor]:
    """The targets of nnU-Net's trainer for labels (B, 1, *S): its transforms per sample
    (regions, then the deep-supervision downsampling), collated per output."""
    lm = label_manager()
    scales = [[s / SHAPES[0][0]] * 3 for s, *_ in SHAPES]
    transforms = nnUNetTrainer.get_validation_transforms(
        scales, False, lm.foreground_labels, lm.foreground_regions, lm.ignore_label
    )
    per_sample = [transforms(segmentation=y.clone())["segmentation"] for y in labels]
    return [torch.stack(t) for t in zip(*per_sample, strict=True)]


def _labels(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (2, 1, *SHAPES[0]), generator=g).to(torch.int16)
    labels[0, :, :6] = 0  # the samples differ, so per-sample and batch Dice differ
    labels[1, :, 4:12, 3:9] = 2
    return labels


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_loss_equals_nnunets_deep_supervised_dc_and_bce(batch_dice: bool) -> None:
    g = torch.Generator().manual_seed(1)
    raw = [3 * torch.randn(2, 3, *s, generator=g) for s in SHAPES]
    labels = _labels(2)
    targets = _nnunet_region_targets(labels)
    assert [tuple(t.shape) for t in targets] == [(2, 3, *s) for s in SHAPES]

    theirs_in = [o.clone().requires_grad_() for o in raw]
    ours_in = [o.clone().requires_grad_() for o in raw]
    expected = _nnunet_region_loss(batch_dice)(theirs_in, targets)
    weights = deep_supervision_weights(len(SHAPES))
    ours = total_loss(ours_in, labels.long(), weights, batch_dice, regions=REGIONS)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)

    # kitsnet downsamples the labels and then makes the masks, nnU-Net the other way round:
    # the same targets at every resolution
    for target, output in zip(targets, raw, strict=True):
        small = torch.nn.functional.interpolate(
            labels.float(), size=output.shape[2:], mode="nearest-exact"
        )
        np.testing.assert_array_equal(
            region_targets(small.long(), REGIONS).numpy(), target.float().numpy()
        )

    expected.backward()
    ours.backward()
    for a, b, w in zip(ours_in, theirs_in, weights, strict=True):
        if w == 0:  # the lowest output is not part of either loss
            assert a.grad is None and b.grad is None
            continue
        assert a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_region_loss_of_one_output_equals_nnunets_dc_and_bce() -> None:
    """No deep supervision (2D-like single output), targets already at its resolution."""
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(3, 3, 20, 18, generator=g)
    labels = torch.randint(0, 4, (3, 1, 20, 18), generator=g)
    masks = torch.from_numpy(np.stack([labels_to_regions(y[0].numpy(), REGIONS) for y in labels]))
    for batch_dice in (False, True):
        dice_kwargs = {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False}
        ref = DC_and_BCE_loss({}, dice_kwargs, dice_class=MemoryEfficientSoftDiceLoss)
        ours = total_loss([logits], labels, [1.0], batch_dice, regions=REGIONS)
        torch.testing.assert_close(ours, ref(logits, masks), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# export: region logits -> labels and compact region probabilities on the original grid

NORMALIZATION = {"clip": [-79.0, 304.0], "mean": 101.0, "std": 76.9}
# name -> (the logits' spacing, their shape, the original spacing, the original shape)
GRIDS = {
    "same_grid": ((1.0, 1.0, 1.0), (20, 26, 22), (1.0, 1.0, 1.0), (20, 26, 22)),
    "isotropic": ((1.0, 1.0, 1.0), (21, 27, 24), (1.3, 0.8, 0.9), (16, 34, 27)),
    "separate_z": ((0.8, 0.8, 0.8), (40, 30, 30), (3.0, 0.75, 0.75), (11, 32, 32)),
}


def _field(shape, rng) -> np.ndarray:
    return smooth_noise(shape, rng, every=5)


def region_logits(shape, seed: int) -> np.ndarray:
    """Region logits of a trained-looking network: far below 0 away from a kidney-like blob
    (so the compact box is smaller than the grid), crossing 0 inside it; the nested regions
    shrink (kidney > masses > tumor) but the noise makes them overlap every way."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-(((z - 0.1) / 0.6) ** 2 + (y / 0.55) ** 2 + ((x + 0.1) / 0.6) ** 2))
    out = np.empty((3, *shape), np.float32)
    for r, gain in enumerate([30, 22, 18]):
        out[r] = gain * blob - 12 + 1.5 * _field(shape, rng)
    return out


def _plan(spacing) -> dict:
    return {
        "configuration": "3d_fullres",
        "spacing": list(spacing),
        "patch_size": [32, 32, 32],
        "normalization": NORMALIZATION,
    }


def _properties(spacing, shape) -> dict:
    return {
        "spacing": list(spacing),
        "shape_before_cropping": list(shape),
        "shape_after_cropping_and_before_resampling": list(shape),
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "sitk_stuff": {
            "spacing": tuple(spacing[::-1]),
            "origin": (0.0,) * 3,
            "direction": np.eye(3).ravel(),
        },
    }


def _nnunet_export(logits, grid):
    """nnU-Net's export of region logits: labels and sigmoid probabilities on the original
    grid, and the resampled logits they come from."""
    src_spacing, _, spacing, shape = grid
    plan = _plan(src_spacing)
    pm = plans_manager(plan)
    cm = pm.get_configuration(plan["configuration"])
    props = _properties(spacing, shape)
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits.copy()),
        pm,
        cm,
        label_manager(),
        props,
        return_probabilities=True,
        num_threads_torch=1,
    )
    resampled = np.asarray(
        cm.resampling_fn_probabilities(logits.copy(), list(shape), list(src_spacing), spacing)
    )
    return np.asarray(seg), np.asarray(probs), resampled


@pytest.fixture(scope="module", params=list(GRIDS))
def exported(request):
    grid = GRIDS[request.param]
    src_spacing, src_shape, spacing, shape = grid
    logits = region_logits(src_shape, seed=5)
    seg, probs, resampled = _nnunet_export(logits, grid)
    order = list(KITS_CLASS_ORDER)
    ours_seg = resample_argmax(logits, shape, src_spacing, 3.0, spacing, class_order=order)
    labels, cp = export_logits(logits, shape, src_spacing, 3.0, spacing, class_order=order)
    ours_resampled = resample(logits, shape, 1, src_spacing, 3.0, spacing)
    return request.param, seg, probs, resampled, ours_seg, labels, cp, ours_resampled


def test_region_export_labels_equal_nnunets_regions_class_order(exported):
    name, seg, _, resampled, ours_seg, labels, _, ours_resampled = exported
    assert seg.shape == ours_seg.shape == GRIDS[name][3]
    np.testing.assert_array_equal(labels, ours_seg)  # one decoding, byte for byte
    # the reference's painting of its own resampled logits is its export's segmentation
    np.testing.assert_array_equal(label_manager().convert_logits_to_segmentation(resampled), seg)
    assert set(np.unique(seg)) == {0, 1, 2, 3}  # every label, and so every overlap, occurs
    # kitsnet resamples the logits in float32 (separable), nnU-Net in float64: where a logit
    # is within rounding of 0 the two sides of the threshold can swap.  Everywhere else the
    # labels must be the same, and such voxels must be rare.
    # (Measured on these grids: no such voxel at all.)
    near_zero = (np.abs(resampled) < EPS).any(0)
    assert near_zero.mean() < 1e-3
    np.testing.assert_array_equal(ours_seg[~near_zero], seg[~near_zero])
    # kitsnet's resampling of the logits (``resample``, order 1) painted by nnU-Net: the same
    painted = label_manager().convert_logits_to_segmentation(ours_resampled)
    np.testing.assert_array_equal(ours_seg[~near_zero], painted[~near_zero])


def test_compact_region_probabilities_are_nnunets_sigmoid_rounded(exported):
    name, _, probs, resampled, _, _, cp, _ = exported
    shape = GRIDS[name][3]
    assert cp.kind == "regions" and cp.shape == shape and cp.q.dtype == np.uint8
    sigmoid = label_manager().apply_inference_nonlin(resampled).numpy()
    np.testing.assert_allclose(probs, sigmoid, rtol=0, atol=1e-7)  # nnU-Net's own two paths
    dense = cp.dense()
    assert probs.shape == dense.shape == (3, *shape)
    assert np.abs(dense - probs).max() <= 0.5 / LEVELS + EPS
    # outside the box the values are 0 and nnU-Net's probabilities would round to 0 there
    outside = np.ones(shape, bool)
    outside[tuple(slice(lo, hi) for lo, hi in cp.box)] = False
    assert outside.any()  # the box is smaller than the grid
    assert not dense[:, outside].any()
    assert probs[:, outside].max() < 0.5 / LEVELS


# ---------------------------------------------------------------------------------------------
# ensembles

ORIGINAL = ((3.0, 0.8, 0.8), (12, 40, 38))
# (configuration, the logits' isotropic spacing), as 3d_fullres and 3d_lowres members
MEMBERS = [("3d_fullres", 0.9), ("3d_lowres", 1.6)]


def _source_shape(grid: float) -> list[int]:
    spacing, shape = ORIGINAL
    return [round(n * s / grid) for n, s in zip(shape, spacing, strict=True)]


@pytest.fixture(scope="module")
def region_members(tmp_path_factory):
    """Two region-based members of one case: nnU-Net's --save_probabilities .npz files and
    kitsnet's compact probabilities."""
    spacing, shape = ORIGINAL
    tmp = tmp_path_factory.mktemp("region_members")
    files, compact = [], []
    for seed, (configuration, grid) in enumerate(MEMBERS):
        logits = region_logits(_source_shape(grid), seed=10 + seed)
        plan = {**_plan([grid] * 3), "configuration": configuration}
        pm = plans_manager(plan)
        out = str(tmp / f"{configuration}_case_00000")
        export_prediction_from_logits(
            logits.copy(),
            _properties(spacing, shape),
            pm.get_configuration(configuration),
            pm,
            region_dataset_json(),
            out,
            save_probabilities=True,
            num_threads_torch=1,
        )
        files.append(out + ".npz")
        order = list(KITS_CLASS_ORDER)
        compact.append(export_logits(logits, shape, [grid] * 3, 3.0, spacing, class_order=order)[1])
    return files, compact, tmp


def test_region_ensemble_is_nnunets_ensembling_of_the_quantised_members(region_members):
    _, compact, tmp = region_members
    dense = []
    for i, cp in enumerate(compact):
        dense.append(str(tmp / f"dense_{i}.npz"))
        np.savez_compressed(dense[-1], probabilities=cp.dense())
    avg = average_probabilities(dense)
    ref = label_manager().convert_probabilities_to_segmentation(avg)
    ours = ensemble_labels(compact)
    assert set(np.unique(ref)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(ours, ref)
    box, mean = average(compact)
    inside = (slice(None), *(slice(lo, hi) for lo, hi in box))
    np.testing.assert_array_equal(mean, avg[inside])
    outside = np.ones(avg.shape[1:], bool)
    outside[inside[1:]] = False
    assert outside.any() and not avg[:, outside].any()


def test_region_ensemble_agrees_with_nnunets_float_ensemble(region_members):
    """On nnU-Net's own float32 probabilities: each member is off by at most half a
    quantisation step, so the mean is too, and the labels differ only where a mean is within
    that of 0.5."""
    files, compact, _ = region_members
    avg = average_probabilities(files)
    ref = label_manager().convert_probabilities_to_segmentation(avg)
    ours = ensemble_labels(compact)
    box, mean = average(compact)
    full = np.zeros_like(avg)
    full[(slice(None), *(slice(lo, hi) for lo, hi in box))] = mean
    assert np.abs(full - avg).max() <= 0.5 / LEVELS + EPS
    close = (np.abs(avg - 0.5) <= 0.5 / LEVELS + EPS).any(0)
    np.testing.assert_array_equal(ours[~close], ref[~close])
    assert (ours == ref).mean() >= 0.999


def softmax_logits(shape, seed: int) -> np.ndarray:
    """4-class logits: certain background around a blob where the three foreground classes
    compete."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-2 * ((z / 0.5) ** 2 + ((y - 0.1) / 0.4) ** 2 + (x / 0.5) ** 2))
    out = np.empty((4, *shape), np.float32)
    out[0] = 12 - 24 * blob + _field(shape, rng)
    for c in range(1, 4):
        out[c] = 2 * _field(shape, rng) - 4 + 13 * blob
    return out


def test_mixed_ensemble_averages_a_softmax_members_class_sums_as_regions(region_members):
    """nnU-Net has no mixed ensemble: a softmax member's region probabilities are by definition
    the sums of its classes' (kidney = 1 - background, masses = tumor + cyst, tumor), exact in
    uint8; the ensemble paints the mean of both members' regions as nnU-Net paints regions."""
    spacing, shape = ORIGINAL
    grid = MEMBERS[0][1]
    _, softmax_cp = export_logits(
        softmax_logits(_source_shape(grid), seed=20), shape, [grid] * 3, 3.0, spacing
    )
    region_cp = region_members[1][1]
    assert softmax_cp.kind == "classes" and region_cp.kind == "regions"

    q = softmax_cp.q.astype(np.int32)
    expected_q = np.stack([LEVELS - q[0], q[2] + q[3], q[2]])
    converted = as_regions(softmax_cp)
    assert converted.kind == "regions" and converted.box == softmax_cp.box
    assert converted.q.dtype == np.uint8
    np.testing.assert_array_equal(converted.q, expected_q)
    # and outside the box (background 255) every region is 0
    outside = np.ones(shape, bool)
    outside[tuple(slice(lo, hi) for lo, hi in softmax_cp.box)] = False
    assert outside.any() and not converted.dense()[:, outside].any()

    p = softmax_cp.dense()
    as_probs = converted.dense()
    np.testing.assert_allclose(as_probs, np.stack([1 - p[0], p[2] + p[3], p[2]]), atol=1e-6)
    # the mean as kitsnet's (and nnU-Net's average_probabilities): float32 sum, / n
    mean = (as_probs + region_cp.dense()) / np.float32(2)
    ref = label_manager().convert_probabilities_to_segmentation(mean)
    ours = ensemble_labels([softmax_cp, region_cp])
    assert set(np.unique(ref)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ensemble_labels([region_cp, softmax_cp]), ref)
