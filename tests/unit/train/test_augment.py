"""Checks for kitsnet.train.augment: plumbing, invariants, determinism, and fidelity to nnU-Net.

The last group compares single transforms with batchgeneratorsv2 (nnU-Net's own augmentation
library) and is skipped where it is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kitsnet.train.augment import (
    DEFAULTS,
    augment_batch,
    cascade_binary_ops,
    default_config,
    remove_random_components,
)
from kitsnet.train.augment.cascade import _dilate
from kitsnet.train.augment.intensity import _contrast, _gamma, _gaussian_blur, _simulate_low_res
from kitsnet.train.augment.spatial import _affine_matrices, _centre_crop, _sampling_grid

OFF = {k: 0.0 for k in DEFAULTS if k.endswith("_p")}
INTENSITY = [
    "noise_p",
    "blur_p",
    "brightness_p",
    "contrast_p",
    "lowres_p",
    "gamma_p",
    "gamma_inv_p",
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A smooth random field (B, 1, *S): blobs to segment, no single-voxel noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    pool = F.avg_pool3d if len(shape) == 5 else F.avg_pool2d
    return pool(pool(x, 5, 1, 2), 5, 1, 2) * 5


def _labels(image: torch.Tensor) -> torch.Tensor:
    return (image > 0.3).long() + (image > 1.0).long()


@pytest.mark.parametrize(
    ("in_shape", "patch", "dtype"),
    [
        ((2, 1, 20, 23, 24), (16, 16, 17), torch.int64),
        ((3, 2, 30, 31), (24, 24), torch.uint8),
    ],
)
def test_all_off_is_exact_centre_crop(in_shape, patch, dtype) -> None:
    image = torch.randn(in_shape)
    seg = torch.randint(0, 4, (in_shape[0], 1, *in_shape[2:]), dtype=dtype)
    out_img, out_seg = augment_batch(image, seg, patch, OFF, _gen())
    assert out_img.shape == (in_shape[0], in_shape[1], *patch)
    assert out_seg.shape == (in_shape[0], 1, *patch) and out_seg.dtype == dtype
    assert torch.equal(out_img, _centre_crop(image, patch))
    assert torch.equal(out_seg, _centre_crop(seg, patch))


def test_defaults_keep_shapes_and_dtypes() -> None:
    image = torch.randn(4, 2, 24, 24, 24)
    seg = torch.randint(0, 3, (4, 1, 24, 24, 24), dtype=torch.uint8)
    out_img, out_seg = augment_batch(image, seg, (16, 16, 16), {}, _gen())
    assert out_img.shape == (4, 2, 16, 16, 16) and out_img.dtype == torch.float32
    assert out_seg.shape == (4, 1, 16, 16, 16) and out_seg.dtype == torch.uint8
    assert torch.isfinite(out_img).all()


@pytest.mark.parametrize("spatial", [(28, 30), (20, 22, 24)])
def test_everything_on_in_2d_and_3d(spatial: tuple[int, ...]) -> None:
    ct = _smooth_volume((2, 1, *spatial))
    seg = _labels(ct)
    onehot = F.one_hot(seg[:, 0], 3).movedim(-1, 1).float()
    image = torch.cat([ct, onehot], dim=1)
    patch = tuple(s - 6 for s in spatial)
    cfg = {k: 1.0 for k in OFF}
    out_img, out_seg = augment_batch(image, seg, patch, cfg, _gen(9), n_intensity_channels=1)
    assert out_img.shape == (2, 4, *patch) and out_seg.shape == (2, 1, *patch)
    assert torch.isfinite(out_img).all()
    assert set(out_img[:, 1:].unique().tolist()) <= {0.0, 1.0}
    prev = cascade_binary_ops(out_img[:, 1:], _gen(1), p=1.0, p_per_label=1.0)
    prev = remove_random_components(prev, _gen(1), p=1.0, p_per_label=1.0)
    assert set(prev.unique().tolist()) <= {0.0, 1.0} and int(prev.sum(1).max()) <= 1


def test_default_config_by_dimension() -> None:
    assert default_config(3)["rotation_deg"] == 30.0
    assert default_config(2)["rotation_deg"] == 180.0
    assert default_config(3)["scale_range"] == [0.7, 1.4]


def test_spatial_keeps_label_set() -> None:
    image = _smooth_volume((3, 1, 28, 28, 28))
    seg = (_labels(image) * 2 + 1).to(torch.uint8)  # labels {1, 3, 5}: no 0 inside the volume
    cfg = {**OFF, "rotation_p": 1.0, "scale_p": 1.0, "scale_range": [0.8, 1.0]}
    _, out_seg = augment_batch(image, seg, (20, 20, 20), cfg, _gen(1))
    # Outside the input counts as background (0), as in nnU-Net; nothing else is invented.
    assert set(out_seg.unique().tolist()) <= {0, 1, 3, 5}
    assert not torch.equal(out_seg, _centre_crop(seg, (20, 20, 20)))


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    image = _smooth_volume((2, 1, 24, 24, 24))
    seg = _labels(image)
    cfg = {k: 0.7 for k in OFF}
    a = augment_batch(image, seg, (16, 16, 16), cfg, _gen(5))
    b = augment_batch(image, seg, (16, 16, 16), cfg, _gen(5))
    c = augment_batch(image, seg, (16, 16, 16), cfg, _gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mirroring_flips_image_and_seg_together() -> None:
    seg = torch.randint(0, 4, (16, 1, 10, 12, 14))
    image = seg.float()  # image is a copy of the labels: any mismatch would show
    cfg = {**OFF, "mirror_p": 0.5}
    out_img, out_seg = augment_batch(image, seg, (8, 10, 12), cfg, _gen(2))
    assert torch.equal(out_img, out_seg.float())
    assert not torch.equal(out_seg, _centre_crop(seg, (8, 10, 12)))  # some sample was flipped

    only_last = {**OFF, "mirror_p": 1.0, "mirror_axes": [2]}
    out_img, out_seg = augment_batch(image, seg, (8, 10, 12), only_last, _gen(2))
    assert torch.equal(out_seg, _centre_crop(seg, (8, 10, 12)).flip(-1))


@pytest.mark.parametrize("key", INTENSITY)
def test_each_intensity_transform_acts_when_forced(key: str) -> None:
    image = _smooth_volume((2, 1, 16, 16, 16))
    seg = _labels(image)
    out_img, out_seg = augment_batch(image, seg, (16, 16, 16), {**OFF, key: 1.0}, _gen(3))
    if key in ("blur_p", "lowres_p"):  # per channel with p 0.5: retry until one applies
        for seed in range(4, 20):
            if not torch.equal(out_img, image):
                break
            out_img, out_seg = augment_batch(
                image, seg, (16, 16, 16), {**OFF, key: 1.0}, _gen(seed)
            )
    assert not torch.equal(out_img, image)
    assert torch.equal(out_seg, seg)


def test_intensity_spares_seg_and_previous_stage_channels() -> None:
    ct = _smooth_volume((2, 1, 20, 20, 20))
    seg = _labels(ct)
    onehot = F.one_hot(seg[:, 0], 3).movedim(-1, 1).float()
    image = torch.cat([ct, onehot], dim=1)
    cfg = {**OFF, **{k: 1.0 for k in INTENSITY}}
    out_img, out_seg = augment_batch(image, seg, (16, 16, 16), cfg, _gen(4), n_intensity_channels=1)
    assert torch.equal(out_seg, _centre_crop(seg, (16, 16, 16)))
    assert torch.equal(out_img[:, 1:], _centre_crop(onehot, (16, 16, 16)))
    assert not torch.equal(out_img[:, :1], _centre_crop(ct, (16, 16, 16)))


def test_previous_stage_channels_move_with_the_labels() -> None:
    ct = _smooth_volume((3, 1, 24, 24, 24), seed=1)
    seg = _labels(ct)
    onehot = F.one_hot(seg[:, 0], 3).movedim(-1, 1).float()
    image = torch.cat([ct, onehot], dim=1)
    cfg = {**OFF, "rotation_p": 1.0, "scale_p": 1.0, "mirror_p": 0.5}
    out_img, out_seg = augment_batch(image, seg, (16, 16, 16), cfg, _gen(7), n_intensity_channels=1)
    # Nearest neighbour on the same grid: the one-hot stays binary and equal to the labels'.
    expected = F.one_hot(out_seg[:, 0], 3).movedim(-1, 1).float()
    inside = out_img[:, 1:].sum(1, keepdim=True) > 0  # outside the input both are zero
    assert set(out_img[:, 1:].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_img[:, 1:] * inside, expected * inside)


def test_bad_inputs_are_rejected() -> None:
    image, seg = torch.randn(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    with pytest.raises(KeyError, match="rotaton_p"):
        augment_batch(image, seg, (8, 8, 8), {"rotaton_p": 0.5}, _gen())
    with pytest.raises(ValueError, match="fit"):
        augment_batch(image, seg, (9, 8, 8), {}, _gen())
    with pytest.raises(TypeError):
        augment_batch(image, seg.float(), (8, 8, 8), {}, _gen())


# ----------------------------------------------------------------------------- transform details


def test_gamma_retains_mean_and_std() -> None:
    x = _smooth_volume((2, 3, 12, 12, 12))
    gamma = torch.tensor([0.7, 1.0, 1.5, 1.2, 0.8, 1.4]).view(2, 3, 1, 1, 1)
    for invert in (False, True):
        y = _gamma(x, gamma, invert)
        dims = (2, 3, 4)
        torch.testing.assert_close(y.mean(dims), x.mean(dims), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(dims), x.std(dims), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y[0, 0], x[0, 0])


def test_contrast_preserves_range() -> None:
    x = _smooth_volume((2, 1, 12, 12, 12))
    y = _contrast(x, torch.tensor([1.25, 0.75]).view(2, 1, 1, 1, 1))
    assert torch.all(y.amin((2, 3, 4)) >= x.amin((2, 3, 4)))
    assert torch.all(y.amax((2, 3, 4)) <= x.amax((2, 3, 4)))


def test_dilation_approximates_a_ball() -> None:
    x = torch.zeros(1, 1, 21, 21, 21)
    x[0, 0, 10, 10, 10] = 1
    for r in (1, 3, 6):
        d = _dilate(x, r)[0, 0] > 0
        zz, yy, xx = torch.meshgrid(*[torch.arange(21) - 10] * 3, indexing="ij")
        dist = (zz**2 + yy**2 + xx**2).float().sqrt()
        assert dist[d].max() <= r * 1.2 + 1e-6  # never much beyond the ball
        assert bool(d[dist <= r * 0.85].all())  # and covers most of it
        assert int(d[10, 10].sum()) == 2 * r + 1  # exact radius along an axis


def _blob_onehot() -> torch.Tensor:
    """(2, 2, 24, 24, 24) one-hot: label 0 a big block plus two small cubes, label 1 a cube."""
    onehot = torch.zeros(2, 2, 24, 24, 24)
    onehot[:, 0, 2:14, 2:14, 2:14] = 1  # 1728 voxels = 12.5% of the patch
    onehot[:, 0, 18:21, 18:21, 18:21] = 1
    onehot[:, 0, 2:4, 18:20, 18:20] = 1
    onehot[:, 1, 16:22, 2:8, 2:8] = 1
    return onehot


def test_cascade_binary_ops_keep_one_hot() -> None:
    onehot = _blob_onehot().to(torch.uint8)
    out = cascade_binary_ops(onehot, _gen(0), p=1.0, p_per_label=1.0)
    assert out.dtype == torch.uint8 and out.shape == onehot.shape
    assert set(out.unique().tolist()) <= {0, 1}
    assert int(out.sum(1).max()) <= 1  # still at most one label per voxel
    assert not torch.equal(out, onehot)
    assert torch.equal(cascade_binary_ops(onehot, _gen(0), p=0.0), onehot)


def test_remove_random_components_drops_one_small_component() -> None:
    onehot = _blob_onehot()
    out = remove_random_components(onehot, _gen(0), p=1.0, p_per_label=1.0, max_fraction=0.1)
    removed = onehot - out
    assert removed.min() >= 0
    for i in range(2):
        # Label 0: exactly one of the two small cubes (27 or 8 voxels); the big block stays.
        assert int(removed[i, 0].sum()) in (27, 8)
        assert bool(out[i, 0, 2:14, 2:14, 2:14].all())
        # Label 1 is a single small component: removed.
        assert int(out[i, 1].sum()) == 0
    assert torch.equal(remove_random_components(onehot, _gen(0), p=0.0), onehot)


# ----------------------------------------------------------------------------- against nnU-Net


def _bgv2():
    return pytest.importorskip(
        "batchgeneratorsv2", reason="nnU-Net's batchgeneratorsv2 is only in the peer venv"
    )


def test_spatial_geometry_matches_nnunet() -> None:
    _bgv2()
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    image = _smooth_volume((1, 1, 40, 40, 40))[0]
    seg = _labels(image)
    angles, scale = [0.3, -0.2, 0.4], 1.2
    ref = SpatialTransform(
        (32, 32, 32), 0, False, p_rotation=1, p_scaling=1, scaling=scale, mode_seg="nearest"
    )
    ref.rotation = lambda image, dim: angles[dim]
    expected = ref(image=image.clone(), segmentation=seg.clone())
    grid = _sampling_grid(
        _affine_matrices(torch.tensor([angles]), torch.tensor([scale]), 3), (40, 40, 40), (32,) * 3
    )
    got = F.grid_sample(image[None], grid, align_corners=True)[0]
    got_seg = F.grid_sample(seg[None].float(), grid, mode="nearest", align_corners=True)[0]
    torch.testing.assert_close(got, expected["image"], atol=1e-4, rtol=0)
    assert torch.equal(got_seg.long(), expected["segmentation"])


def test_intensity_transforms_match_nnunet() -> None:
    _bgv2()
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    x = _smooth_volume((1, 1, 20, 22, 24))[0]

    sigmas = [0.6, 0.8, 1.0]
    expected = x.clone()
    for axis, s in enumerate(sigmas):
        expected = blur_dimension(expected, s, axis)
    got = _gaussian_blur(x[None], torch.tensor(sigmas).view(1, 1, 3), torch.ones(1, 1, dtype=bool))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)

    contrast = ContrastTransform(1.2, preserve_range=True, synchronize_channels=False)
    expected = contrast(image=x.clone())["image"]
    torch.testing.assert_close(_contrast(x[None], torch.tensor(1.2))[0], expected)

    for invert in (0, 1):
        gamma = GammaTransform(1.3, invert, False, p_per_channel=1, p_retain_stats=1)
        expected = gamma(image=x.clone())["image"]
        got = _gamma(x[None], torch.tensor(1.3), bool(invert))[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    lowres = SimulateLowResolutionTransform(0.6, False, True, None, p_per_channel=1)
    expected = lowres(image=x.clone())["image"]
    got = _simulate_low_res(x[None], torch.tensor([[0.6]]), torch.ones(1, 1, dtype=bool))[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_shapes_and_determinism() -> None:
    image = _smooth_volume((2, 1, 24, 24, 24)).cuda()
    seg = _labels(image).to(torch.uint8)
    cfg = {k: 0.7 for k in OFF}
    a = augment_batch(image, seg, (16, 16, 16), cfg, _gen(5))
    b = augment_batch(image, seg, (16, 16, 16), cfg, _gen(5))
    assert a[0].is_cuda and a[1].is_cuda and a[0].shape == (2, 1, 16, 16, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    onehot = _blob_onehot().cuda()
    out = cascade_binary_ops(onehot, torch.Generator(device="cuda").manual_seed(0), 1.0, 1.0)
    assert out.is_cuda and int(out.sum(1).max()) <= 1
    assert remove_random_components(onehot, _gen(0), 1.0, 1.0).is_cuda
