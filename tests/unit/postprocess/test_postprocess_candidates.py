"""The candidate steps, the learned minimum volume and apply_steps, on small synthetic label maps.

Each candidate is checked on a label map built so that the expected result can be written down
by hand: two kidneys (label 1) with a tumor (2) and a cyst (3), plus the kind of false positive
the candidate targets.  The comparison with nnU-Net's own code is in
tests/nnunet/test_postprocess_nnunet.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kitsnet.core.io import KitsnetError
from kitsnet.postprocess import components
from kitsnet.postprocess.apply import apply_steps
from kitsnet.postprocess.candidates import (
    CANDIDATES,
    learn_min_volume,
    smallest_component_mm3,
)
from kitsnet.postprocess.components import foreground_box, label_components

SPACING = (2.0, 1.0, 1.0)  # 2 mm3 per voxel


def two_kidneys(shape=(20, 30, 40)) -> np.ndarray:
    """Left kidney (label 1) with a tumor (2), right kidney with a cyst (3), far apart."""
    seg = np.zeros(shape, np.uint8)
    seg[5:15, 5:20, 3:13] = 1  # 1500 voxels
    seg[8:12, 8:12, 10:13] = 2
    seg[4:14, 6:18, 25:34] = 1  # 1080 voxels
    seg[6:9, 8:11, 25:28] = 3
    return seg


def test_candidates_are_the_documented_ones_in_order():
    assert CANDIDATES == (
        "kidney_min_volume",
        "masses_on_kidney",
        "kidney_two_largest",
        "foreground_largest",
        "label_largest_1",
        "label_largest_2",
        "label_largest_3",
    )


def test_two_kidneys_survive_kidney_two_largest_but_not_foreground_largest():
    seg = two_kidneys()
    seg[17:19, 25:27, 20:22] = 1  # a false positive, smaller than both kidneys
    kept = apply_steps(seg, SPACING, ["kidney_two_largest"], None)
    expected = two_kidneys()
    np.testing.assert_array_equal(kept, expected)
    largest = apply_steps(seg, SPACING, ["foreground_largest"], None)
    # nnU-Net's rule keeps only the larger (left) kidney: the right one is deleted
    assert np.count_nonzero(largest[:, :, 20:]) == 0
    np.testing.assert_array_equal(largest[:, :, :20], expected[:, :, :20])


def test_kidney_min_volume_removes_components_below_the_volume_in_mm3():
    seg = two_kidneys()
    seg[17:19, 25:27, 20:22] = 2  # 8 voxels = 16 mm3
    seg[0:3, 25:28, 18:21] = 1  # 27 voxels = 54 mm3
    out = apply_steps(seg, SPACING, ["kidney_min_volume"], 20.0)
    assert np.count_nonzero(out[17:19, 25:27, 20:22]) == 0
    np.testing.assert_array_equal(out[0:3, 25:28, 18:21], 1)
    # a component exactly at the threshold stays (strictly smaller ones go)
    out = apply_steps(seg, SPACING, ["kidney_min_volume"], 16.0)
    np.testing.assert_array_equal(out, seg)
    # same voxels, coarser spacing: 8 voxels x 3 mm3 = 24 mm3 >= 20 mm3 stays
    out = apply_steps(seg, (3.0, 1.0, 1.0), ["kidney_min_volume"], 20.0)
    np.testing.assert_array_equal(out, seg)


def test_masses_on_kidney_drops_masses_away_from_every_kidney():
    seg = two_kidneys()
    seg[16:19, 24:28, 18:22] = 2  # a floating tumor
    seg[15:17, 20:22, 13:15] = 3  # a cyst touching the left kidney at a corner only
    out = apply_steps(seg, SPACING, ["masses_on_kidney"], None)
    assert np.count_nonzero(out[16:19, 24:28, 18:22]) == 0
    np.testing.assert_array_equal(out[15:17, 20:22, 13:15], 3)  # 26-connected: kept
    np.testing.assert_array_equal(out[two_kidneys() > 0], two_kidneys()[two_kidneys() > 0])


def test_label_largest_keeps_that_labels_largest_component_only():
    seg = two_kidneys()
    seg[5:7, 5:7, 30:32] = 2  # a second, smaller tumor inside the right kidney
    for label in (1, 2, 3):
        out = apply_steps(seg, SPACING, [f"label_largest_{label}"], None)
        others = seg != label
        np.testing.assert_array_equal(out[others], seg[others])  # other labels untouched
        lab, n = label_components(seg == label)
        sizes = np.bincount(lab.ravel())[1:]
        keep = np.isin(lab, 1 + np.flatnonzero(sizes == sizes.max()))
        np.testing.assert_array_equal(out == label, keep)
    out = apply_steps(seg, SPACING, ["label_largest_1"], None)
    assert np.count_nonzero(out[:, :, 20:] == 1) == 0  # the right kidney's label 1 is gone


def test_ties_keep_every_component_of_the_largest_size_as_nnunet_does():
    seg = np.zeros((10, 10, 20), np.uint8)
    seg[1:4, 1:4, 1:4] = 1
    seg[1:4, 1:4, 10:13] = 1
    seg[6:8, 6:8, 16:18] = 1
    out = apply_steps(seg, (1, 1, 1), ["foreground_largest"], None)
    assert np.count_nonzero(out) == 54
    seg[6:9, 6:9, 16:19] = 1  # three of 27: all tied for the two largest
    out = apply_steps(seg, (1, 1, 1), ["kidney_two_largest"], None)
    np.testing.assert_array_equal(out, seg)


def test_apply_steps_follows_the_given_order():
    """masses_on_kidney then label_largest_1 keeps a tumor whose kidney part is small; the
    reverse order first removes that kidney part, and then the tumor floats and goes."""
    seg = np.zeros((12, 12, 30), np.uint8)
    seg[2:10, 2:10, 2:10] = 1  # main kidney
    seg[4:6, 4:6, 20:22] = 1  # small kidney part ...
    seg[4:8, 4:8, 22:26] = 2  # ... carrying a tumor
    a = apply_steps(seg, SPACING, ["masses_on_kidney", "label_largest_1"], None)
    b = apply_steps(seg, SPACING, ["label_largest_1", "masses_on_kidney"], None)
    assert np.count_nonzero(a == 2) == 64 and np.count_nonzero(a[:, :, 20:22] == 1) == 0
    assert np.count_nonzero(b == 2) == 0
    np.testing.assert_array_equal(a[:, :, :12], seg[:, :, :12])
    np.testing.assert_array_equal(b[:, :, :12], seg[:, :, :12])


def test_apply_steps_keeps_input_layout_and_leaves_input_alone():
    seg = np.asfortranarray(two_kidneys())
    seg[17:19, 25:27, 20:22] = 1
    before = seg.copy()
    out = apply_steps(seg, SPACING, list(CANDIDATES), 10.0)
    np.testing.assert_array_equal(seg, before)
    assert out.dtype == np.uint8 and out.flags.f_contiguous and out is not seg
    np.testing.assert_array_equal(apply_steps(seg, SPACING, [], None), seg)
    empty = np.zeros((4, 5, 6), np.int16)
    np.testing.assert_array_equal(apply_steps(empty, SPACING, ["foreground_largest"], None), 0)


@pytest.mark.parametrize(
    ("seg", "steps", "min_volume", "message"),
    [
        (two_kidneys(), ["largest"], None, "unknown postprocessing step"),
        (two_kidneys(), ["kidney_min_volume"], None, "needs a positive min_volume_mm3"),
        (two_kidneys() * 2, ["foreground_largest"], None, "label 6 outside 0-3"),
        (two_kidneys().astype(np.float32), [], None, "integer labels"),
    ],
)
def test_apply_steps_errors_say_what_is_wrong(seg, steps, min_volume, message):
    with pytest.raises(KitsnetError, match=message):
        apply_steps(seg, SPACING, steps, min_volume)


def test_min_volume_is_half_the_smallest_reference_kidney_not_a_stray_voxel():
    ref = two_kidneys()
    ref[17:19, 25:27, 20:22] = 3  # 8 voxels: a stray component, not a kidney
    # the smaller kidney, 1080 voxels of 2 mm3
    assert smallest_component_mm3(ref, SPACING) == 2160.0
    assert smallest_component_mm3(np.asfortranarray(ref), (1.0, 1.0, 0.5)) == 540.0
    solitary = two_kidneys()
    solitary[4:14, 6:18, 25:34] = 0  # one kidney left (1500 voxels) and a 8-voxel stray
    solitary[17:19, 25:27, 20:22] = 1
    assert smallest_component_mm3(solitary, SPACING) == 3000.0
    assert smallest_component_mm3(np.zeros((3, 3, 3), np.uint8), SPACING) is None
    assert learn_min_volume([None, 16.0, 2160.0]) == 8.0
    assert learn_min_volume([None, None]) is None


def test_label_components_fall_back_to_int32_beyond_65535_components():
    mask = np.zeros((100, 100, 60), bool)
    mask[::2, ::2, ::2] = True  # isolated voxels, even under 26-connectivity
    labels, count = label_components(mask)
    assert count == 50 * 50 * 30 and labels.dtype == np.int32
    labels, count = label_components(mask[:20])
    assert count == 10 * 50 * 30 and labels.dtype == np.uint16


def test_slab_loops_give_the_same_result_as_one_slab(monkeypatch):
    rng = np.random.default_rng(3)
    seg = (rng.random((30, 20, 20)) > 0.7).astype(np.uint8) * rng.integers(1, 4, (30, 20, 20))
    seg = seg.astype(np.uint8)
    expected = {s: apply_steps(seg, SPACING, [s], 5.0) for s in CANDIDATES}
    monkeypatch.setattr(components, "CHUNK_VOXELS", 500)  # a few slices per slab
    for step, want in expected.items():
        np.testing.assert_array_equal(apply_steps(seg, SPACING, [step], 5.0), want)


def test_foreground_box_with_margin_is_clipped():
    seg = np.zeros((10, 12, 14), np.uint8)
    assert foreground_box(seg) is None
    seg[0, 3:5, 13] = 2
    assert foreground_box(seg, margin=1) == (slice(0, 2), slice(2, 6), slice(12, 14))
    assert foreground_box(np.asfortranarray(seg)) == (slice(0, 1), slice(3, 5), slice(13, 14))
