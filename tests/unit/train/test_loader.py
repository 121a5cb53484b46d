"""The training input pipeline: where the final patches land, crops, the sampled region."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kitsnet.train.augment import DEFAULTS, augment_batch
from kitsnet.train.loader import PatchSampler, augment_settings, box_range, crop, region_size

NO_AUG = {k: 0.0 for k in DEFAULTS if k.endswith("_p")}


def _coordinate_store(shape: tuple[int, ...], axis: int) -> SimpleNamespace:
    """One case whose image holds 1 + the voxel's index along ``axis`` (0 only in padding)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    image = np.broadcast_to(np.arange(1, shape[axis] + 1, dtype=np.float32).reshape(view), shape)
    return SimpleNamespace(
        cases=["c"],
        image={"c": image[None]},
        seg={"c": np.broadcast_to(np.uint8(0), shape)},
        locs={"c": {1: np.zeros((0, 3), np.int64)}},
        prev=None,
    )


def _final_centres(shape, patch, axis, draws=300, seed=0) -> np.ndarray:
    """Coordinate (along ``axis``) of the centre voxel of each final patch: the sampled region
    centre-cropped to the patch by the augmentation (spatial transforms off)."""
    dim = len(patch)
    region = region_size(patch, {"rotation_p": 0.2, "scale_p": 0.2}, dim)
    sampler = PatchSampler(
        _coordinate_store(shape, axis), region, patch, dim, 0.0, np.random.default_rng(seed)
    )
    gen = torch.Generator().manual_seed(seed)
    centres = []
    for _ in range(draws // 2):
        img, seg = sampler.sample(2, 0)
        out, _ = augment_batch(torch.from_numpy(img), torch.from_numpy(seg), patch, NO_AUG, gen)
        centre = (slice(None), 0, *[p // 2 for p in patch])
        centres += (out[centre] - 1).tolist()
    return np.array(centres)


@pytest.mark.parametrize(
    ("shape", "patch"),
    [((60, 70, 45), [32, 32, 32]), ((9, 100, 80), [64, 64])],
)
def test_final_patch_centres_cover_the_whole_image_but_half_a_patch(shape, patch) -> None:
    """Centres reach [p/2, S - p/2] on every axis (at most one voxel more at the low end, where
    nnU-Net's box range rounds its odd padding), so every voxel is trained on; in 2D every
    slice is drawn."""
    dim = len(patch)
    axes = range(1, 3) if dim == 2 else range(3)
    for a, p in zip(axes, patch, strict=True):
        c = _final_centres(shape, patch, a)
        assert p // 2 - 1 <= c.min() <= p // 2, (a, c.min())
        assert shape[a] - p // 2 <= c.max() <= shape[a] - p // 2 + 1, (a, c.max())
    if dim == 2:
        slices = _final_centres(shape, patch, 0)
        assert sorted(set(slices.astype(int).tolist())) == list(range(shape[0]))


def test_an_axis_shorter_than_the_region_is_padded_on_both_sides() -> None:
    lo, hi = box_range((100, 300), [205, 205], [128, 128])
    # region 205 over 100 voxels: the image sits in the middle of the region, give or take one
    assert (lo[0], hi[0]) == (-53, -52)
    assert (lo[1], hi[1]) == (-39, 134)  # need 77: up to 39 voxels before, 39 past the image


def test_region_is_the_patch_without_spatial_augmentation() -> None:
    assert region_size([32, 32, 32], NO_AUG, 3) == [32, 32, 32]
    assert region_size([128, 128, 128], {"rotation_p": 0.2, "scale_p": 0.2}, 3) == [205] * 3
    # 2D: nnU-Net's +-180 deg, capped at 90 for the region: 512 / 0.85
    assert region_size([512, 512], {"rotation_p": 0.2, "rotation_deg_2d": 180.0}, 2) == [602] * 2


def test_2d_networks_rotate_in_plane_by_their_own_range() -> None:
    aug = {"rotation_deg": 30.0, "rotation_deg_2d": 180.0, "region_scale": 0.85}
    assert augment_settings(aug, 2) == {"rotation_deg": 180.0}
    assert augment_settings(aug, 3) == {"rotation_deg": 30.0}


def test_crop_pads_outside_the_volume():
    arr = np.arange(27).reshape(3, 3, 3)
    out = crop(arr, np.array([-1, 1, 2]), (3, 3, 3), -5)
    assert out.shape == (3, 3, 3)
    assert (out[0] == -5).all() and out[1, 0, 0] == arr[0, 1, 2] and out[1, 0, 1] == -5
