"""Normalisation and resampling: geometry round-trips, label safety."""

from __future__ import annotations

import numpy as np

from kitsnet.preprocess import normalize_ct, resample, resample_labels


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
