"""Connected-component postprocessing against nnU-Net v2's own code on the same label maps.

Needs the optional ``peer`` extra; skipped without it.  nnU-Net's candidates are
``remove_all_but_largest_component_from_segmentation`` (nnunetv2.postprocessing) over the
foreground labels [1, 2, 3] and over each label, built on acvl_utils'
``remove_all_but_largest_component`` (``skimage.measure.label`` with full connectivity, ties for
the largest all kept).  kitsnet's ``foreground_largest`` and ``label_largest_<k>`` must give the
same label map voxel for voxel on random blobby 3D label maps (several components per label,
touching labels, anisotropic spacing, both memory orders), and a sequence of steps must equal
nnU-Net's ``apply_postprocessing`` of the same functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from acvl_utils.morphology.morphology_helper import (  # noqa: E402
    generic_filter_components,
    label_with_component_sizes,
)
from nnunetv2.postprocessing.remove_connected_components import (  # noqa: E402
    apply_postprocessing,
    remove_all_but_largest_component_from_segmentation,
)

from kitsnet.postprocess.apply import apply_steps  # noqa: E402
from kitsnet.postprocess.components import label_components  # noqa: E402

pytestmark = pytest.mark.peer

SEEDS = [0, 1, 2, 3, 4, 5]
SPACING = (2.5, 0.8, 0.8)


def blobby_labels(seed: int, shape=(40, 56, 48)) -> np.ndarray:
    """Smoothed noise cut at quantiles: many components per label, nested and touching."""
    rng = np.random.default_rng(seed)
    field = scipy.ndimage.gaussian_filter(rng.random(shape), sigma=rng.uniform(1.5, 3.0))
    cuts = np.quantile(field, [0.78, 0.88, 0.94])
    seg = np.zeros(shape, np.uint8)
    seg[field > cuts[0]] = 1
    seg[field > cuts[1]] = 2
    seg[(field > cuts[2]) & (rng.random(shape) > 0.3)] = 3  # speckled: many small components
    return seg if seed % 2 == 0 else np.asfortranarray(seg)


@pytest.mark.parametrize("seed", SEEDS)
def test_foreground_largest_equals_nnunet(seed):
    seg = blobby_labels(seed)
    ours = apply_steps(seg, SPACING, ["foreground_largest"], None)
    theirs = remove_all_but_largest_component_from_segmentation(seg, [1, 2, 3])
    assert np.count_nonzero(ours != seg) > 0  # the map had several components
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("label", [1, 2, 3])
def test_label_largest_equals_nnunet(seed, label):
    seg = blobby_labels(seed)
    ours = apply_steps(seg, SPACING, [f"label_largest_{label}"], None)
    theirs = remove_all_but_largest_component_from_segmentation(seg, label)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_step_sequence_equals_nnunet_apply_postprocessing(seed):
    seg = blobby_labels(seed)
    fn = remove_all_but_largest_component_from_segmentation
    kwargs = [{"labels_or_regions": 2}, {"labels_or_regions": 3}, {"labels_or_regions": 1}]
    theirs = apply_postprocessing(seg, [fn] * 3, kwargs)
    steps = ["label_largest_2", "label_largest_3", "label_largest_1"]
    ours = apply_steps(seg, SPACING, steps, None)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_components_and_two_largest_match_acvl_utils(seed):
    """Same partition into components as skimage's full connectivity, and kidney_two_largest
    equals acvl_utils' generic filter keeping the two largest sizes (ties included)."""
    mask = blobby_labels(seed) > 0
    ours, n_ours = label_components(mask)
    theirs, sizes = label_with_component_sizes(mask)
    assert n_ours == len(sizes)
    pairs = np.unique(np.stack([ours[mask], theirs[mask]]), axis=1)
    assert pairs.shape[1] == n_ours  # a one-to-one relabelling

    def two_largest(ids, counts):
        second = sorted(counts)[-2] if len(counts) > 1 else 0
        return [i for i, c in zip(ids, counts, strict=True) if c >= second]

    seg = blobby_labels(seed)
    keep = generic_filter_components(seg > 0, two_largest)
    expected = np.where(keep, seg, 0)
    np.testing.assert_array_equal(apply_steps(seg, SPACING, ["kidney_two_largest"], None), expected)
