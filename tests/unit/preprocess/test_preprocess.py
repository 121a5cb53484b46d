"""Normalisation and resampling: geometry round-trips, label safety."""

from __future__ import annotations

import numpy as np
import pytest

from kitsnet.core.resample import resample, resample_argmax, resample_labels
from kitsnet.preprocess.case import normalize_ct


def _blob(shape):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (zz**2 + yy**2 + xx**2 < 0.5).astype(np.float32)


def test_resampling_round_trip_keeps_shape_and_content():
    img = _blob((30, 40, 40)) * 100
    down = resample(img, (15, 20, 20), 3, spacing=(1, 1, 1))
    back = resample(down, img.shape, 3, spacing=(1, 1, 1))
    assert back.shape == img.shape and back.dtype == np.float32
    # a smooth blob survives a 2x down/up round trip up to its boundary
    assert np.abs(back - img).mean() < 6


def test_resampling_keeps_the_centre_of_mass():
    """Voxel centres are aligned, so a structure does not drift when resampled."""
    img = _blob((31, 41, 41))
    up = resample(img, (62, 82, 82), 1, spacing=(1, 1, 1))
    com = lambda a: np.array(np.nonzero(a > 0.5)).mean(1) / np.array(a.shape)  # noqa: E731
    np.testing.assert_allclose(com(img), com(up), atol=0.02)


def test_label_resampling_only_produces_input_labels():
    seg = np.zeros((20, 30, 30), np.uint8)
    seg[5:15, 5:25, 5:25] = 1
    seg[8:12, 10:14, 10:14] = 2
    out = resample_labels(seg, (33, 47, 51), spacing=(1, 1, 1))
    assert set(np.unique(out)) <= {0, 1, 2} and (out == 2).any()
    back = resample_labels(out, seg.shape, spacing=(1, 1, 1))
    assert (back == seg).mean() > 0.97


def test_anisotropic_cases_use_nearest_along_slices():
    img = np.zeros((4, 16, 16), np.float32)
    img[1] = 100.0
    out = resample(img, (8, 16, 16), 3, spacing=(5.0, 0.8, 0.8))
    # nearest along the thick-slice axis: values copied, no spline overshoot between slices
    assert set(np.unique(out)) <= {0.0, 100.0}


def test_ct_normalisation_clips_then_zscores():
    norm = {"clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}
    out = normalize_ct(np.array([-1000.0, 50.0, 1000.0]), norm)
    np.testing.assert_allclose(out, [-6.0, 0.0, 6.0])


# (shape, new shape, spacing, new spacing): isotropic up/down, anisotropic along each axis
GEOMETRIES = [
    ((20, 31, 17), (40, 25, 30), (1.0, 1.0, 1.0), None),
    ((10, 31, 17), (33, 25, 30), (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ((21, 10, 17), (21, 33, 9), (0.8, 2.5, 0.8), (0.8, 0.8, 0.8)),
    ((33, 25, 30), (10, 31, 17), (1.0, 1.0, 1.0), (5.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize(("shape", "new", "spacing", "new_spacing"), GEOMETRIES)
def test_separable_resampling_equals_ndimage_zoom_to_float32_rounding(
    order, shape, new, spacing, new_spacing
):
    """The fast path is the same arithmetic as ndimage.zoom (prefilter padding, coordinates,
    per-slice clipping of anisotropic cases), so only float32 rounding separates them."""
    img = np.random.default_rng(order).standard_normal(shape).astype(np.float32) * 100
    exact = resample(img, new, order, spacing, 3.0, new_spacing, exact=True)
    fast = resample(img, new, order, spacing, 3.0, new_spacing)
    assert fast.dtype == exact.dtype == np.float32
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("slab", [1, 7, 64])
@pytest.mark.parametrize(("shape", "new", "spacing", "new_spacing"), GEOMETRIES)
def test_slab_wise_argmax_export_equals_resampling_all_logits(
    slab, shape, new, spacing, new_spacing
):
    rng = np.random.default_rng(slab)
    logits = rng.standard_normal((4, *shape)).astype(np.float32)
    full = resample(logits, new, 1, spacing, 3.0, new_spacing, exact=True)
    seg = resample_argmax(logits, new, spacing, 3.0, new_spacing, slab=slab)
    assert seg.dtype == np.uint8 and seg.shape == tuple(new)
    top2 = np.sort(full, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-5
    assert decided.mean() > 0.999
    np.testing.assert_array_equal(seg[decided], full.argmax(0)[decided])
