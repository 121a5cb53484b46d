"""The KiTS regions: labels to regions and back, a softmax's region probabilities, the plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kitsnet.core.regions import (
    REGION_NAMES,
    REGIONS,
    REGIONS_CLASS_ORDER,
    class_to_region_probabilities,
    labels_to_regions,
    output_channels,
    plan_regions,
    region_settings,
    regions_to_labels,
)
from kitsnet.stages import (
    BASE_CONFIGURATIONS,
    CONFIGURATIONS,
    NUM_CLASSES,
    base_configuration,
    is_region_based,
)

BACKGROUND, KIDNEY, TUMOR, CYST = 0, 1, 2, 3


def test_regions_are_the_kits_hec_regions_painted_kidney_cyst_tumor():
    assert dict(zip(REGION_NAMES, REGIONS, strict=True)) == {
        "kidney": (KIDNEY, TUMOR, CYST),
        "masses": (TUMOR, CYST),
        "tumor": (TUMOR,),
    }
    assert REGIONS_CLASS_ORDER == (KIDNEY, CYST, TUMOR)


def test_labels_to_regions_marks_each_label_in_the_regions_holding_it():
    seg = np.array([[BACKGROUND, KIDNEY], [TUMOR, CYST]], dtype=np.uint8)
    inside = labels_to_regions(seg, REGIONS)
    assert inside.dtype == bool and inside.shape == (3, 2, 2)
    np.testing.assert_array_equal(inside[:, 0, 0], [False, False, False])  # background
    np.testing.assert_array_equal(inside[:, 0, 1], [True, False, False])  # kidney
    np.testing.assert_array_equal(inside[:, 1, 0], [True, True, True])  # tumor
    np.testing.assert_array_equal(inside[:, 1, 1], [True, True, False])  # cyst


@pytest.mark.parametrize(
    ("kidney", "masses", "tumor", "label"),
    [
        (True, True, True, TUMOR),  # all three: tumor, painted last
        (True, True, False, CYST),  # kidney and masses only: cyst
        (True, False, False, KIDNEY),  # kidney only
        (False, False, False, BACKGROUND),
        # inconsistent overlaps a network can still output: the later region wins
        (False, True, False, CYST),
        (False, False, True, TUMOR),
        (True, False, True, TUMOR),
        (False, True, True, TUMOR),
    ],
)
def test_regions_to_labels_paints_in_class_order_later_regions_on_top(kidney, masses, tumor, label):
    inside = np.array([kidney, masses, tumor]).reshape(3, 1, 1, 1)
    seg = regions_to_labels(inside, REGIONS_CLASS_ORDER)
    assert seg.dtype == np.uint8 and seg.shape == (1, 1, 1)
    assert seg.item() == label


def test_labels_round_trip_through_their_regions():
    seg = np.random.default_rng(0).integers(0, 4, size=(7, 9, 8)).astype(np.uint8)
    back = regions_to_labels(labels_to_regions(seg, REGIONS), REGIONS_CLASS_ORDER)
    np.testing.assert_array_equal(back, seg)


def _random_q(rng, shape) -> np.ndarray:
    """uint8 class probabilities summing to exactly 255 per voxel (as quantise makes them),
    extremes included."""
    cuts = np.sort(rng.integers(0, 256, size=(3, *shape)), axis=0)
    edges = np.concatenate([np.zeros((1, *shape), int), cuts, np.full((1, *shape), 255)])
    q = np.diff(edges, axis=0).astype(np.uint8)
    q[:, 0, 0, 0] = (255, 0, 0, 0)
    q[:, 0, 0, 1] = (0, 0, 255, 0)
    q[:, 0, 0, 2] = (0, 85, 85, 85)
    return q


def test_class_to_region_probabilities_are_exact_sums_in_uint8():
    q = _random_q(np.random.default_rng(1), (5, 6, 7))
    assert (q.sum(0, dtype=np.int32) == 255).all()
    r = class_to_region_probabilities(q, REGIONS)
    assert r.dtype == np.uint8 and r.shape == (3, 5, 6, 7)
    wide = q.astype(np.int32)
    np.testing.assert_array_equal(r[0], 255 - wide[0])  # kidney = 1 - background
    np.testing.assert_array_equal(r[1], wide[2] + wide[3])  # masses = tumor + cyst
    np.testing.assert_array_equal(r[2], wide[2])  # tumor
    np.testing.assert_array_equal(r[:, 0, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(r[:, 0, 0, 1], [255, 255, 255])
    np.testing.assert_array_equal(r[:, 0, 0, 2], [255, 170, 85])  # no uint8 overflow


def test_class_to_region_probabilities_of_floats_sum_the_probabilities():
    rng = np.random.default_rng(2)
    p = rng.random((4, 3, 4, 5)).astype(np.float32)
    p /= p.sum(0)
    r = class_to_region_probabilities(p, REGIONS)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r, np.stack([1 - p[0], p[2] + p[3], p[2]]), atol=1e-6)


def test_region_plan_entries_round_trip_through_json():
    settings = json.loads(json.dumps(region_settings()))
    assert settings == {
        "regions": [[1, 2, 3], [2, 3], [2]],
        "region_names": ["kidney", "masses", "tumor"],
        "regions_class_order": [1, 3, 2],
    }
    plan = {"num_classes": NUM_CLASSES, **settings}
    assert plan_regions(plan) == ([[1, 2, 3], [2, 3], [2]], [1, 3, 2])
    assert output_channels(plan) == 3


def test_label_based_plans_have_no_regions_and_one_output_per_class():
    for plan in ({"num_classes": NUM_CLASSES}, {"num_classes": NUM_CLASSES, "regions": []}):
        assert plan_regions(plan) is None
        assert output_channels(plan) == NUM_CLASSES


def test_every_configuration_has_a_region_based_twin_on_its_base():
    for base in BASE_CONFIGURATIONS:
        assert not is_region_based(base) and base_configuration(base) == base
        twin = f"{base}_regions"
        assert twin in CONFIGURATIONS
        assert is_region_based(twin) and base_configuration(twin) == base
    assert len(CONFIGURATIONS) == 2 * len(BASE_CONFIGURATIONS)
