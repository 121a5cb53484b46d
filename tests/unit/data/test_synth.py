"""Tests for kitsnet.data.synth: the synthetic KiTS21-like cases the CPU demo trains and scores
on."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kitsnet.core.io import KitsnetError
from kitsnet.data.synth import (
    INPLANE_RANGE,
    SLICE_THICKNESSES,
    _Ellipsoid,
    _on_surface,
    _rotation,
    generate_case,
    kits_affine,
    make_dataset,
)

SEED = 0
N_CASES = 10  # seed 0 gives cysts in 4 of these, and all are small enough to stay fast


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    return [generate_case(i, SEED) for i in range(N_CASES)]


def test_same_index_and_seed_give_identical_arrays() -> None:
    a_img, a_lab, a_sp = generate_case(3, SEED)
    b_img, b_lab, b_sp = generate_case(3, SEED)
    assert a_sp == b_sp
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)


def test_different_seed_or_index_gives_a_different_case() -> None:
    img, _, sp = generate_case(3, SEED)
    other_img, _, other_sp = generate_case(3, SEED + 1)
    assert sp != other_sp or not np.array_equal(img, other_img)
    assert generate_case(4, SEED)[2] != sp or not np.array_equal(generate_case(4, SEED)[0], img)


def test_arrays_have_kits_dtypes_and_matching_shapes(cases) -> None:
    for img, lab, _ in cases:
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert img.shape == lab.shape and img.ndim == 3
        assert img.min() >= -1024 and img.max() <= 3071


def test_spacing_is_within_kits21_ranges(cases) -> None:
    for img, _, (s0, s1, s2) in cases:
        assert s0 in SLICE_THICKNESSES
        assert s1 == s2 and INPLANE_RANGE[0] <= s1 <= INPLANE_RANGE[1]
        fov = np.array(img.shape) * np.array([s0, s1, s2])
        assert 70 <= fov[0] <= 90 and 105 <= fov[1] <= 135  # ~80 mm and ~120 mm, +-10 %


def test_labels_are_kits_classes_with_kidney_and_tumour_in_every_case(cases) -> None:
    for _, lab, _ in cases:
        present = set(np.unique(lab).tolist())
        assert present <= {0, 1, 2, 3}
        assert {1, 2} <= present  # every KiTS21 case has kidney and tumour


def test_cysts_appear_in_some_but_not_all_cases(cases) -> None:
    with_cyst = sum(bool((lab == 3).any()) for _, lab, _ in cases)
    assert 0 < with_cyst < len(cases)


def test_every_tumour_touches_the_kidney(cases) -> None:
    for _, lab, _ in cases:
        components, n = ndimage.label(lab == 2)
        near = ndimage.binary_dilation(components > 0, iterations=1)
        kidney = (lab == 1) | (lab == 3)
        for k in range(1, n + 1):
            grown = ndimage.binary_dilation(components == k, iterations=1)
            assert (grown & kidney).any(), f"tumour component {k} is not adjacent to the kidney"
        assert (near & kidney).any()


def test_lesions_sit_on_the_surface_inside_or_bulging_out() -> None:
    """Positive depth makes lesions exophytic, so the tumour label leaves the kidney."""
    kidney = _Ellipsoid(np.zeros(3), np.array([28.0, 14.0, 13.0]), _rotation([20, 10, -5]))
    rng = np.random.default_rng(0)

    def q(point: np.ndarray) -> float:
        return float(np.linalg.norm((kidney.rot.T @ (point - kidney.centre)) / kidney.semi))

    for _ in range(50):
        assert q(_on_surface(rng, kidney, 8.0, 0.5)) > 1.0
        assert q(_on_surface(rng, kidney, 8.0, -0.5)) < 1.0
        assert q(_on_surface(rng, kidney, 8.0, 0.0)) == pytest.approx(1.0)


def test_intensities_are_plausible(cases) -> None:
    for img, lab, _ in cases:
        kidney = float(img[lab == 1].mean())
        fat = img[(lab == 0) & (img > -300) & (img < -30)]
        assert fat.size > 0.02 * img.size  # subcutaneous and visceral fat exist
        assert kidney > 100 > float(fat.mean())
        assert 100 < float(img[lab == 2].mean()) < 300  # hyper-enhancing, heterogeneous
        corners = img[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert float(np.median(corners)) < -900  # air outside the body
        if (lab == 3).any():
            assert -20 <= float(img[lab == 3].mean()) <= 40  # near water


def test_kits_affine_has_axis_codes_ipl() -> None:
    affine = kits_affine((3.0, 0.8, 0.7))
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [3.0, 0.8, 0.7])
    np.testing.assert_array_equal(affine[:3, 3], 0)


def test_make_dataset_writes_kits_layout_and_keeps_other_files(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    ids = make_dataset(tmp_path, cases=2, seed=SEED)
    assert ids == sorted(ids) == ["case_00000", "case_00001"]
    assert other.read_text() == "keep me"
    for index, case_id in enumerate(ids):
        img, lab, spacing = generate_case(index, SEED)
        folder = tmp_path / case_id
        assert sorted(p.name for p in folder.iterdir()) == [
            "aggregated_MAJ_seg.nii.gz",
            "imaging.nii.gz",
        ]
        for name, expected, dtype in (
            ("imaging.nii.gz", img, np.int16),
            ("aggregated_MAJ_seg.nii.gz", lab, np.uint8),
        ):
            nii = nib.load(str(folder / name))
            data = np.asanyarray(nii.dataobj)
            assert data.dtype == dtype
            np.testing.assert_array_equal(data, expected)
            np.testing.assert_allclose(nii.affine, kits_affine(spacing))
            assert nib.aff2axcodes(nii.affine) == ("I", "P", "L")
            assert tuple(float(z) for z in nii.header.get_zooms()) == spacing


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KitsnetError):
        generate_case(-1, SEED)
    with pytest.raises(KitsnetError):
        make_dataset(tmp_path, cases=0, seed=SEED)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(KitsnetError):
        make_dataset(not_a_folder, cases=1, seed=SEED)
