"""Export of a region-based network: labels painted from region logits, compact region
probabilities (kind "regions"), their files, and ensembles of region and softmax members."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import smooth_noise

from kitsnet.core.io import KitsnetError
from kitsnet.core.regions import REGIONS_CLASS_ORDER, regions_to_labels
from kitsnet.core.resample import resample, resample_argmax
from kitsnet.predict.averaging import as_regions, average, ensemble, ensemble_labels
from kitsnet.predict.probabilities import (
    CLASSES,
    FORMAT,
    LEVELS,
    REGIONS_KIND,
    CompactProbabilities,
    background_margin,
    export_logits,
    load_probabilities,
    quantise,
    quantise_regions,
    save_probabilities,
)

ORDER = list(REGIONS_CLASS_ORDER)
# (logits' spacing, their shape, original spacing, original shape)
GRIDS = {
    "isotropic": ((1.0, 1.0, 1.0), (23, 30, 26), (1.3, 0.7, 0.9), (18, 43, 29)),
    "separate_z": ((0.8, 0.8, 0.8), (45, 32, 32), (3.0, 0.75, 0.75), (12, 34, 34)),
}


def _field(shape, rng) -> np.ndarray:
    return smooth_noise(shape, rng, every=5)


def region_logits(shape, seed: int = 0) -> np.ndarray:
    """Three region logits, far below 0 away from a blob and crossing 0 inside it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-(((z - 0.1) / 0.6) ** 2 + (y / 0.55) ** 2 + ((x + 0.1) / 0.6) ** 2))
    out = np.empty((3, *shape), np.float32)
    for r, gain in enumerate([30, 22, 18]):
        out[r] = gain * blob - 12 + 1.5 * _field(shape, rng)
    return out


def class_logits(shape, seed: int = 0) -> np.ndarray:
    """Four class logits: certain background around a blob where the classes compete."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-2 * ((z / 0.5) ** 2 + ((y - 0.1) / 0.4) ** 2 + (x / 0.5) ** 2))
    out = np.empty((4, *shape), np.float32)
    out[0] = 12 - 24 * blob + _field(shape, rng)
    for c in range(1, 4):
        out[c] = 2 * _field(shape, rng) - 4 + 13 * blob
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


@pytest.fixture(scope="module", params=list(GRIDS))
def region_export(request):
    src_sp, src_shape, sp, shape = GRIDS[request.param]
    logits = region_logits(src_shape, seed=3)
    seg, cp = export_logits(logits, shape, src_sp, 3.0, sp, class_order=ORDER)
    full = resample(logits, shape, 1, src_sp, 3.0, sp)
    return logits, GRIDS[request.param], seg, cp, full


def test_region_export_labels_are_resample_argmax_with_the_class_order(region_export):
    logits, (src_sp, _, sp, shape), seg, _, full = region_export
    ours = resample_argmax(logits, shape, src_sp, 3.0, sp, class_order=ORDER)
    assert seg.dtype == np.uint8 and seg.shape == shape
    np.testing.assert_array_equal(seg, ours)
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    # the definition: each region above 0 painted in class order, on the resampled logits;
    # only where a resampled logit is within float32 rounding of 0 could the paths differ
    painted = regions_to_labels(full > 0, ORDER)
    near_zero = (np.abs(full) < 1e-5).any(0)
    assert near_zero.mean() < 1e-3
    np.testing.assert_array_equal(seg[~near_zero], painted[~near_zero])


def test_region_export_is_not_an_argmax_over_regions(region_export):
    """Labels are painted (tumor wins where it is above 0), not the largest region logit."""
    _, _, seg, _, full = region_export
    tumor = full[2] > 0
    assert tumor.any() and (full[0][tumor] > full[2][tumor]).any()
    assert (seg[tumor] == 2).all()


def test_compact_region_probabilities_are_each_sigmoid_rounded(region_export):
    _, (_, _, _, shape), _, cp, full = region_export
    assert cp.kind == REGIONS_KIND and cp.n_classes == 3 and cp.shape == shape
    assert cp.q.dtype == np.uint8
    dense = cp.dense()
    sig = _sigmoid(full)
    assert np.abs(dense - sig).max() <= 0.5 / LEVELS + 1e-5
    # rounded on their own: no sum to 255 (unlike class probabilities)
    assert (cp.q.sum(0, dtype=np.int32) != LEVELS).any()
    # rint(255 p) of each: the same uint8 but where float rounding moves p across a half step
    plain = quantise_regions(sig[(slice(None), *_slices(cp.box))]).astype(np.int16)
    assert np.abs(cp.q.astype(np.int16) - plain).max() <= 1
    assert (cp.q == plain).mean() >= 0.999


def _slices(box):
    return tuple(slice(lo, hi) for lo, hi in box)


def test_compact_region_probabilities_are_zero_outside_the_box(region_export):
    _, (_, _, _, shape), _, cp, full = region_export
    outside = np.ones(shape, bool)
    outside[_slices(cp.box)] = False
    assert outside.any() and (~outside).any()
    assert not cp.dense()[:, outside].any()
    # justified: every region's sigmoid there rounds to 0
    assert full[:, outside].max() < -background_margin(3, REGIONS_KIND)
    assert _sigmoid(full[:, outside]).max() < 0.5 / LEVELS
    assert background_margin(3, REGIONS_KIND) == pytest.approx(np.log(2 * LEVELS))


def test_all_background_region_logits_give_an_empty_box():
    logits = np.full((3, 6, 7, 8), -20.0, np.float32)
    seg, cp = export_logits(logits, (9, 7, 5), class_order=ORDER)
    assert not seg.any() and cp.q.size == 0
    assert all(lo == hi for lo, hi in cp.box)
    assert cp.dense().shape == (3, 9, 7, 5) and not cp.dense().any()


# ---------------------------------------------------------------------------------------------
# files


def test_region_probabilities_round_trip_through_their_file(tmp_path, region_export):
    cp = region_export[3]
    path = tmp_path / "case.npz"
    save_probabilities(path, cp)
    with np.load(path) as z:
        assert str(z["kind"]) == REGIONS_KIND and str(z["format"]) == FORMAT
    back = load_probabilities(path)
    assert back.kind == REGIONS_KIND and back.box == cp.box and back.shape == cp.shape
    np.testing.assert_array_equal(back.q, cp.q)


def test_a_file_without_kind_loads_as_class_probabilities(tmp_path):
    """Files written before region-based models: softmax probabilities."""
    q = quantise(np.full((4, 2, 3, 2), 0.25, np.float32))
    path = tmp_path / "old.npz"
    np.savez_compressed(
        path,
        probabilities=q,
        box=np.array([[1, 3], [0, 3], [2, 4]], np.int64),
        shape=np.array([4, 3, 5], np.int64),
        format=np.array(FORMAT),
    )
    cp = load_probabilities(path)
    assert cp.kind == CLASSES and cp.box == [[1, 3], [0, 3], [2, 4]] and cp.shape == (4, 3, 5)
    dense = cp.dense()
    assert (dense[0, 0] == 1).all()  # background outside the box


def test_an_unknown_kind_is_refused(tmp_path):
    cp = CompactProbabilities(np.zeros((3, 1, 1, 1), np.uint8), [[0, 1]] * 3, (2, 2, 2), "odd")
    path = tmp_path / "odd.npz"
    save_probabilities(path, cp)
    with pytest.raises(KitsnetError, match="kind 'odd'"):
        load_probabilities(path, case="case_00001")


def test_region_files_need_not_sum_to_255_but_class_files_must(tmp_path):
    q = np.array([200, 100, 7], np.uint8).reshape(3, 1, 1, 1)
    box = [[0, 1]] * 3
    save_probabilities(tmp_path / "r.npz", CompactProbabilities(q, box, (1, 1, 1), REGIONS_KIND))
    assert load_probabilities(tmp_path / "r.npz").q.sum() == 307
    save_probabilities(tmp_path / "c.npz", CompactProbabilities(q, box, (1, 1, 1), CLASSES))
    with pytest.raises(KitsnetError, match="do not sum to 255"):
        load_probabilities(tmp_path / "c.npz")


# ---------------------------------------------------------------------------------------------
# ensembles

SHAPE, SPACING = (12, 36, 34), (3.0, 0.8, 0.8)


def _members():
    """Two region members (on 0.9 mm and 1.6 mm grids) and one softmax member, one case."""
    out = []
    for seed, grid, kind in [(0, 0.9, "r"), (1, 1.6, "r"), (2, 0.9, "c")]:
        src = [round(n * s / grid) for n, s in zip(SHAPE, SPACING, strict=True)]
        if kind == "r":
            logits, order = region_logits(src, seed), ORDER
        else:
            logits, order = class_logits(src, seed), None
        out.append(export_logits(logits, SHAPE, [grid] * 3, 3.0, SPACING, class_order=order)[1])
    return out


@pytest.fixture(scope="module")
def members():
    return _members()


def _painted_mean(dense: list[np.ndarray]) -> np.ndarray:
    mean = dense[0].copy()
    for d in dense[1:]:
        mean += d
    mean /= np.float32(len(dense))
    return regions_to_labels(mean > 0.5, ORDER)


def test_region_ensemble_paints_the_mean_region_probabilities(members):
    a, b, _ = members
    ref = _painted_mean([a.dense(), b.dense()])
    seg = ensemble_labels([a, b])
    assert seg.dtype == np.uint8 and set(np.unique(ref)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(seg, ref)
    np.testing.assert_array_equal(ensemble_labels([a, b], slab=5), ref)
    box, mean = average([a, b])
    assert box == [[min(a.box[i][0], b.box[i][0]), max(a.box[i][1], b.box[i][1])] for i in range(3)]
    np.testing.assert_array_equal(mean, ((a.dense() + b.dense()) / np.float32(2))[:, *_slices(box)])
    labels, cp = ensemble([a, b])
    np.testing.assert_array_equal(labels, ref)
    assert cp.kind == REGIONS_KIND and cp.box == box
    np.testing.assert_array_equal(cp.q, quantise_regions(mean))


def test_a_softmax_member_as_regions_sums_its_classes_exactly(members):
    soft = members[2]
    assert soft.kind == CLASSES
    conv = as_regions(soft)
    q = soft.q.astype(np.int32)
    assert conv.kind == REGIONS_KIND and conv.box == soft.box and conv.shape == soft.shape
    np.testing.assert_array_equal(conv.q, np.stack([LEVELS - q[0], q[2] + q[3], q[2]]))
    # outside the box (voxel (0, 0, 0)): background 255, so every region 0
    assert all(lo > 0 for lo, _ in soft.box) and not conv.dense()[:, 0, 0, 0].any()
    assert as_regions(members[0]) is members[0]


def test_mixed_ensemble_averages_as_regions(members):
    region, _, soft = members
    ref = _painted_mean([as_regions(soft).dense(), region.dense()])
    assert set(np.unique(ref)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(ensemble_labels([soft, region]), ref)
    np.testing.assert_array_equal(ensemble_labels([region, soft]), ref)
    labels, cp = ensemble([soft, region])
    np.testing.assert_array_equal(labels, ref)
    assert cp.kind == REGIONS_KIND and cp.n_classes == 3


def test_softmax_members_alone_still_ensemble_by_argmax(members):
    soft = members[2]
    other = export_logits(
        class_logits([round(n * s / 1.6) for n, s in zip(SHAPE, SPACING, strict=True)], 4),
        SHAPE,
        [1.6] * 3,
        3.0,
        SPACING,
    )[1]
    mean = (soft.dense() + other.dense()) / np.float32(2)
    np.testing.assert_array_equal(ensemble_labels([soft, other]), mean.argmax(0))
    assert ensemble([soft, other])[1].kind == CLASSES


def test_members_on_different_grids_are_refused(members):
    a = members[0]
    other = CompactProbabilities(a.q, a.box, (a.shape[0] + 1, *a.shape[1:]), a.kind)
    with pytest.raises(ValueError, match="different grids"):
        ensemble_labels([a, other])
