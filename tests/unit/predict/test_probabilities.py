"""Compact probabilities: the export's segmentation unchanged, the quantisation, the box, files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kitsnet.core.io import KitsnetError
from kitsnet.core.resample import resample, resample_argmax
from kitsnet.predict.averaging import ensemble_argmax
from kitsnet.predict.probabilities import (
    FORMAT,
    CompactProbabilities,
    background_margin,
    export_logits,
    load_probabilities,
    quantise,
    save_probabilities,
)

# (source spacing, original spacing, source shape, original shape): linear in every axis, and
# an isotropic grid back to 3 mm slices (nearest along the slice axis, nnU-Net's separate z)
ISOTROPIC = ((1.0, 1.0, 1.0), (1.3, 0.7, 0.9), (31, 56, 50), (24, 80, 56))
SEPARATE_Z = ((0.78, 0.78, 0.78), (3.0, 0.8, 0.8), (80, 64, 64), (21, 62, 62))
SOURCE_ANISOTROPIC = ((3.0, 0.8, 0.8), (2.5, 0.7, 0.7), (20, 48, 48), (24, 55, 55))
GRIDS = {"isotropic": ISOTROPIC, "separate_z": SEPARATE_Z, "anisotropic": SOURCE_ANISOTROPIC}


def smooth_field(shape, rng) -> np.ndarray:
    """Smooth unit-variance noise: realistic regions for the arg-max."""
    small = ndimage.gaussian_filter(rng.standard_normal([max(2, s // 6) for s in shape]), 1.0)
    small /= small.std()
    zoom = [s / m for s, m in zip(shape, small.shape, strict=True)]
    return ndimage.zoom(small, zoom, order=1).astype(np.float32)


def kidney_logits(shape, seed: int = 0, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4-class logits: certain background (margin ~15) around a blob where the three
    foreground classes compete, as a trained network's logits around a kidney."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, s) - c for s, c in zip(shape, centre, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    blob = np.exp(-2 * ((z / 0.5) ** 2 + (y / 0.45) ** 2 + (x / 0.5) ** 2)).astype(np.float32)
    out = np.empty((4, *shape), np.float32)
    out[0] = 12 - 24 * blob + smooth_field(shape, rng)
    for c in range(1, 4):
        out[c] = 2 * smooth_field(shape, rng) - 3 + 12 * blob
    return out


def reference_q(logits, grid) -> np.ndarray:
    """The whole grid the plain way: resample every class, softmax, quantise."""
    src_sp, new_sp, _, new_shape = grid
    full = resample(logits, new_shape, 1, src_sp, 3.0, new_sp)
    full -= full.max(0)
    np.exp(full, out=full)
    return quantise(full / full.sum(0))


def _foreground_within_margin(logits, grid) -> np.ndarray:
    src_sp, new_sp, _, new_shape = grid
    full = resample(logits, new_shape, 1, src_sp, 3.0, new_sp)
    return full[1:].max(0) - full[0] > -background_margin(4)


def _export(grid, seed=0, **kw):
    src_sp, new_sp, src_shape, new_shape = grid
    logits = kidney_logits(src_shape, seed)
    return logits, *export_logits(logits, new_shape, src_sp, 3.0, new_sp, **kw)


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("slab", [16, 5])
def test_segmentation_is_byte_identical_to_resample_argmax(name, slab):
    src_sp, new_sp, src_shape, new_shape = GRIDS[name]
    logits, seg, cp = _export(GRIDS[name], slab=slab)
    assert seg.dtype == np.uint8 and seg.shape == new_shape
    assert seg.tobytes() == resample_argmax(logits, new_shape, src_sp, 3.0, new_sp).tobytes()
    assert (seg > 0).any() and cp.shape == new_shape


@pytest.mark.parametrize("name", list(GRIDS))
def test_outside_the_box_is_exactly_background_and_the_box_is_tight(name):
    logits, seg, cp = _export(GRIDS[name])
    ref = reference_q(logits, GRIDS[name])
    inside = tuple(slice(lo, hi) for lo, hi in cp.box)
    outside = np.ones(cp.shape, bool)
    outside[inside] = False
    assert 0 < outside.mean() < 1
    assert np.all(ref[0][outside] == 255) and not np.any(ref[1:][:, outside])
    assert np.all(seg[outside] == 0)
    # inside: the same numbers as the plain computation (up to float32 rounding)
    assert (ref[(slice(None), *inside)] == cp.q).mean() > 0.999
    # holds every voxel that is not (255, 0, 0, 0), and is tight: at most 2 voxels per side
    # beyond the voxels whose resampled logits are within T (background_margin) of background
    not_bg = np.nonzero(ref[0] != 255)
    near = np.nonzero(_foreground_within_margin(logits, GRIDS[name]))
    for (lo, hi), idx, close in zip(cp.box, not_bg, near, strict=True):
        assert lo <= close.min() <= idx.min() and idx.max() <= close.max() < hi
        assert close.min() - lo <= 2 and hi - 1 - close.max() <= 2


def test_quantised_classes_sum_to_255_within_one_step_ties_to_the_lower_class():
    rng = np.random.default_rng(1)
    p = rng.dirichlet([0.3] * 4, size=20000).T.astype(np.float32)
    q = quantise(p)
    assert q.dtype == np.uint8 and np.all(q.sum(0, dtype=int) == 255)
    assert np.abs(q / 255 - p).max() < 1 / 255
    ties = np.array([[0.5, 0.25, 0.2], [0.5, 0.25, 0.2], [0, 0.25, 0.2], [0, 0.25, 0.4]])
    assert quantise(ties.astype(np.float32)).T.tolist() == [
        [128, 127, 0, 0],  # 127.5 twice: the one missing unit goes to class 0
        [64, 64, 64, 63],  # 63.75 four times: three units, classes 0-2
        [51, 51, 51, 102],
    ]


@pytest.mark.parametrize("name", list(GRIDS))
def test_dense_argmax_equals_the_segmentation(name):
    _, seg, cp = _export(GRIDS[name], seed=3)
    dense = cp.dense()
    assert dense.dtype == np.float32 and dense.shape == (4, *cp.shape)
    np.testing.assert_allclose(dense.sum(0), 1, atol=1e-5)
    assert (dense.argmax(0) == seg).mean() >= 0.9999


def test_region_fills_the_parts_outside_the_box_with_background():
    _, _, cp = _export(ISOTROPIC)
    (z0, z1), (y0, y1), (x0, x1) = cp.box
    box = [[z0 - 2, z0 + 3], [y0, y1], [0, 4]]  # straddles the box, and wholly left of it
    got = cp.region([[max(0, lo), hi] for lo, hi in box])
    dense = cp.dense()
    np.testing.assert_array_equal(got, dense[:, max(0, z0 - 2) : z0 + 3, y0:y1, 0:4])


def test_save_load_round_trip(tmp_path):
    _, _, cp = _export(SEPARATE_Z)
    save_probabilities(tmp_path / "case_00000.npz", cp)
    back = load_probabilities(tmp_path / "case_00000.npz")
    assert back.box == cp.box and back.shape == cp.shape
    np.testing.assert_array_equal(back.q, cp.q)
    with np.load(tmp_path / "case_00000.npz") as z:
        assert set(z.files) == {"probabilities", "box", "shape", "format", "kind"}
        assert str(z["format"]) == FORMAT


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        mid = len(raw) // 3
        raw[mid : mid + 64] = bytes(64)
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_damaged_file_raises_naming_it(tmp_path, how):
    _, _, cp = _export(ISOTROPIC)
    path = tmp_path / "case_00007.npz"
    save_probabilities(path, cp)
    _corrupt(path, how)
    with pytest.raises(KitsnetError, match="case_00007.npz") as err:
        load_probabilities(path, case="case_00007")
    assert str(err.value).startswith("case_00007: ")


def test_inconsistent_files_raise_naming_the_problem(tmp_path):
    _, _, cp = _export(ISOTROPIC)
    good = {"probabilities": cp.q, "box": np.array(cp.box), "shape": np.array(cp.shape)}
    bad = {
        "missing": {k: v for k, v in good.items() if k != "box"},
        "do not sum": {**good, "probabilities": cp.q // 2},
        "fill the box": {**good, "probabilities": cp.q[:, 1:]},
        "outside the grid": {**good, "shape": np.array(cp.shape) // 4},
    }
    for problem, arrays in bad.items():
        path = tmp_path / "case_00001.npz"
        np.savez_compressed(path, format=np.array(FORMAT), **arrays)
        with pytest.raises(KitsnetError, match=f"case_00001.npz.*{problem}"):
            load_probabilities(path)
    with pytest.raises(KitsnetError, match="missing"):
        load_probabilities(tmp_path / "nothing.npz")


def test_all_background_gives_an_empty_box(tmp_path):
    logits = np.zeros((4, 10, 12, 14), np.float32)
    logits[0] = 20.0
    seg, cp = export_logits(logits, (15, 12, 9))
    assert not seg.any() and cp.q.shape == (4, 0, 0, 0)
    assert all(lo == hi for lo, hi in cp.box)
    np.testing.assert_array_equal(cp.dense().argmax(0), 0)
    assert np.all(cp.dense()[0] == 1)
    save_probabilities(tmp_path / "empty.npz", cp)
    back = load_probabilities(tmp_path / "empty.npz")
    assert not ensemble_argmax([back, cp]).any()
    assert isinstance(back, CompactProbabilities) and back.shape == (15, 12, 9)
