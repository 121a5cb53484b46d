"""Ensembles from compact probabilities: nnU-Net's averaging, the output geometry, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import smooth_noise

from kitsnet.core.io import KitsnetError, save_volume
from kitsnet.core.resample import resample
from kitsnet.predict.averaging import average, ensemble_argmax
from kitsnet.predict.ensemble import ensemble_folder
from kitsnet.predict.probabilities import export_logits, save_probabilities

ORIGINAL = (26, 70, 64)  # 3 mm slices, 0.8 mm in-plane
SPACING = (3.0, 0.8, 0.8)
# member A on a 0.78 mm grid, member B on a 1.6 mm one (as 3d_fullres and 3d_lowres)
MEMBERS = {"a": ((0.78,) * 3, (100, 72, 66)), "b": ((1.6,) * 3, (49, 35, 32))}


def _field(shape, rng) -> np.ndarray:
    return smooth_noise(shape, rng, every=6)


def member_logits(shape, seed: int) -> np.ndarray:
    """Certain background around a kidney-like blob where the foreground classes compete."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-2 * ((z / 0.5) ** 2 + ((y - 0.1) / 0.4) ** 2 + (x / 0.5) ** 2))
    out = np.empty((4, *shape), np.float32)
    out[0] = 12 - 24 * blob + _field(shape, rng)
    for c in range(1, 4):
        out[c] = 2 * _field(shape, rng) - 3 + 12 * blob
    return out


@pytest.fixture(scope="module")
def members():
    """Per member: its float32 probabilities on the original grid and its compact form."""
    out = {}
    for seed, (name, (spacing, shape)) in enumerate(MEMBERS.items()):
        logits = member_logits(shape, seed)
        _, cp = export_logits(logits, ORIGINAL, spacing, 3.0, SPACING)
        full = resample(logits, ORIGINAL, 1, spacing, 3.0, SPACING)
        full -= full.max(0)
        np.exp(full, out=full)
        out[name] = (full / full.sum(0), cp)
    return out


def test_ensemble_is_the_argmax_of_the_float32_mean_of_the_dense_probabilities(members):
    (pa, a), (pb, b) = members["a"], members["b"]
    seg = ensemble_argmax([a, b], slab=5)
    assert seg.shape == ORIGINAL and seg.dtype == np.uint8 and (seg > 0).any()
    mean = a.dense()
    mean += b.dense()
    mean /= np.float32(2)  # nnU-Net's average_probabilities, on the compact members
    np.testing.assert_array_equal(seg, mean.argmax(0))
    # and the float32 ensemble of the unquantised probabilities
    assert (seg == ((pa + pb) / 2).argmax(0)).mean() >= 0.9999
    box, avg = average([a, b])
    inside = tuple(slice(lo, hi) for lo, hi in box)
    np.testing.assert_array_equal(avg, mean[(slice(None), *inside)])
    assert np.abs(avg - ((pa + pb) / 2)[(slice(None), *inside)]).max() < 1 / 255 + 1e-5
    assert all(min(m.box[i][0] for m in (a, b)) == box[i][0] for i in range(3))


def _write_member_files(root, members, cases, affine, zooms):
    """results/probabilities/{a,b}/fold_0 and the first member's predictions."""
    for name, (_, cp) in members.items():
        for case in cases:
            save_probabilities(root / "probabilities" / name / "fold_0" / f"{case}.npz", cp)
    hdr = nib.Nifti1Header()
    hdr["sform_code"], hdr["qform_code"] = 1, 2
    for case in cases:
        path = root / "predictions" / "a" / "fold_0" / f"{case}.nii.gz"
        save_volume(np.zeros(ORIGINAL, np.uint8), path, affine, header=hdr, spacing=zooms)
    return [root / "probabilities" / n / "fold_0" for n in members], path.parent


def test_ensemble_folder_writes_the_first_members_geometry(tmp_path, members):
    rot = np.array([[0.0, 0, -1], [0, -1, 0], [1, 0, 0]])  # an oblique-free but permuted frame
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array(SPACING)
    affine[:3, 3] = [-120.5, 80.25, -300.0]
    dirs, geometry = _write_member_files(tmp_path, members, ["case_00001"], affine, SPACING)
    ensemble_folder(dirs, geometry, ["case_00001"], tmp_path / "out", log=lambda *_: None)
    got, ref = (
        nib.load(tmp_path / "out" / "case_00001.nii.gz"),
        nib.load(geometry / "case_00001.nii.gz"),
    )
    np.testing.assert_array_equal(got.affine, ref.affine)
    np.testing.assert_array_equal(got.header.get_sform(), ref.header.get_sform())
    np.testing.assert_allclose(got.header.get_qform(), ref.header.get_qform(), atol=1e-6)
    assert got.header.get_zooms() == ref.header.get_zooms()
    assert int(got.header["sform_code"]) == 1 and int(got.header["qform_code"]) == 2
    assert got.get_data_dtype() == np.uint8
    seg = np.asarray(got.dataobj)
    np.testing.assert_array_equal(seg, ensemble_argmax([m[1] for m in members.values()]))


def test_missing_member_names_the_case_and_the_file(tmp_path, members):
    cases = ["case_00001", "case_00002"]
    dirs, geometry = _write_member_files(tmp_path, members, cases, np.diag([*SPACING, 1]), SPACING)
    (dirs[1] / "case_00002.npz").unlink()
    with pytest.raises(KitsnetError, match=r"case_00002: .*b/fold_0/case_00002\.npz"):
        ensemble_folder(dirs, geometry, cases, tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out" / "case_00001.nii.gz").exists()  # checked before any work
    (geometry / "case_00001.nii.gz").unlink()
    with pytest.raises(KitsnetError, match=r"case_00001: .*a/fold_0/case_00001\.nii\.gz"):
        ensemble_folder(dirs, geometry, cases[:1], tmp_path / "out", log=lambda *_: None)


def test_members_on_another_grid_name_the_case_and_the_file(tmp_path, members):
    cases = ["case_00003"]
    dirs, geometry = _write_member_files(tmp_path, members, cases, np.eye(4), SPACING)
    _, other = export_logits(member_logits((30, 30, 30), 5), (20, 20, 20))
    save_probabilities(dirs[1] / "case_00003.npz", other)
    with pytest.raises(KitsnetError, match=r"case_00003: .*b/fold_0/case_00003\.npz.*grid"):
        ensemble_folder(dirs, geometry, cases, tmp_path / "out", log=lambda *_: None)
    with pytest.raises(ValueError, match="different grids"):
        ensemble_argmax([members["a"][1], other])


def test_workflow_adapter_writes_every_fold_of_the_pair(tmp_path, members, repo):
    """workflow_scripts/ensemble.py as rule ensemble runs it: inputs matched to folds by name."""
    import json
    import runpy
    from types import SimpleNamespace

    results = tmp_path / "results"
    splits = [{"train": [], "val": ["case_00001"]}, {"train": [], "val": ["case_00002"]}]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    prob_dirs, geometry = [], []
    for fold, case in enumerate(["case_00001", "case_00002"]):
        for name, (_, cp) in members.items():
            save_probabilities(
                results / "probabilities" / name / f"fold_{fold}" / f"{case}.npz", cp
            )
            prob_dirs.append(str(results / "probabilities" / name / f"fold_{fold}"))
        folder = results / "predictions" / "a" / f"fold_{fold}"
        save_volume(np.zeros(ORIGINAL, np.uint8), folder / f"{case}.nii.gz", np.eye(4))
        geometry.append(str(folder))
    outputs = [str(results / "predictions" / "a+b" / f"fold_{k}") for k in (0, 1)]
    snakemake = SimpleNamespace(
        input=SimpleNamespace(
            splits=str(tmp_path / "splits.json"), probabilities=prob_dirs, geometry=geometry
        ),
        params=SimpleNamespace(members=["a", "b"], folds=[0, 1]),
        output=SimpleNamespace(predictions=outputs),
        log=[str(tmp_path / "logs" / "ensemble.log")],
    )
    runpy.run_path(
        str(repo / "workflow_scripts" / "ensemble.py"), init_globals={"snakemake": snakemake}
    )
    expected = ensemble_argmax([cp for _, cp in members.values()])
    for out, case in zip(outputs, ["case_00001", "case_00002"], strict=True):
        np.testing.assert_array_equal(
            np.asarray(nib.load(f"{out}/{case}.nii.gz").dataobj), expected
        )
