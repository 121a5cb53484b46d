"""Sliding-window inference and export geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from kitsnet.predict.infer import (
    compute_steps,
    gaussian_importance,
    logits_to_original,
    sliding_window,
    write_prediction,
)


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_steps_cover_the_volume_with_half_patch_overlap():
    steps = compute_steps([100, 64, 30], [32, 32, 32], 0.5)
    assert steps[0][0] == 0 and steps[0][-1] == 100 - 32
    assert max(np.diff(steps[0])) <= 16
    assert steps[1] == [0, 16, 32] and steps[2] == [0]


def test_gaussian_importance_peaks_in_the_centre_and_has_no_zeros():
    g = gaussian_importance([16, 16, 16])
    assert g.max() == 1.0 and g[8, 8, 8] == 1.0 and g.min() > 0


def test_sliding_window_reassembles_a_volume_exactly_for_an_identity_model():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 37, 29, 21)).astype(np.float32)  # 3 "classes" = 3 channels
    out = sliding_window([Identity()], image, [16, 16, 16], 3, step=0.5, mirror=True, tile_batch=3)
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_sliding_window_pads_volumes_smaller_than_the_patch():
    image = np.ones((2, 5, 40, 40), np.float32)
    out = sliding_window([Identity()], image, [8, 16, 16], 2, mirror=False)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_export_writes_the_original_grid_and_geometry(tmp_path):
    spacing = [2.5, 0.8, 0.8]
    affine = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    geometry = {
        "original_shape": [10, 50, 50],
        "original_spacing": spacing,
        "affine": affine.tolist(),
        "sform_code": 2,
        "qform_code": 0,
    }
    logits = np.zeros((4, 16, 40, 40), np.float32)
    logits[0] = 1
    logits[1, 4:12, 10:30, 10:30] = 5
    plan = {"spacing": [1.5625, 1.0, 1.0], "anisotropy_threshold": 3.0}  # the logits grid
    seg = logits_to_original(logits, geometry, plan)
    assert seg.shape == (10, 50, 50) and set(np.unique(seg)) == {0, 1}
    write_prediction(seg, geometry, tmp_path / "p.nii.gz")
    img = nib.load(tmp_path / "p.nii.gz")
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(img.header.get_zooms(), spacing)
    assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
    assert img.header["sform_code"] == 2 and img.header.get_data_dtype() == np.uint8
