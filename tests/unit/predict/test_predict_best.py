"""`kitsnet predict` after model selection: run from a workflow folder it uses the best model
(ensemble and postprocessing included) and says so; for the same case and models its labels
are the workflow's prediction job's, byte for byte (the cascade and an ensemble included)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from kitsnet.cli import main

pytestmark = pytest.mark.workflow


def _fold0_case(micro_demo) -> str:
    splits = json.loads((micro_demo / "results/dataset/splits.json").read_text())
    return splits[0]["val"][0]


def test_predict_from_the_demo_folder_uses_the_best_model_on_a_new_scan(
    micro_demo, tmp_path, monkeypatch, capsys
):
    from kitsnet.data.synth import make_dataset
    from kitsnet.predict.probabilities import load_probabilities

    (case,) = make_dataset(tmp_path / "new", 1, seed=99)
    image = tmp_path / "new" / case / "imaging.nii.gz"
    monkeypatch.chdir(micro_demo)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(image), "--out", str(out), "--save-probabilities"]) == 0
    best = json.loads((micro_demo / "results/best_configuration.json").read_text())
    said = capsys.readouterr()
    assert f"model {best['model']} (the best of model selection" in said.out
    assert "tiles" in said.err and "left" in said.err  # progress per case on stderr
    pred, ref = nib.load(out / f"{case}.nii.gz"), nib.load(image)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    found = load_probabilities(out / f"{case}.npz")
    probs = found.dense()
    if found.kind == "regions":  # a region-based model, or an ensemble with one
        assert probs.shape == (3, *ref.shape) and probs.min() >= 0 and probs.max() <= 1
    else:
        assert probs.shape == (4, *ref.shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_predict_with_a_mixed_ensemble_segments_every_scan_and_saves_region_probabilities(
    micro_demo, tmp_path, one_torch_thread
):
    """An ensemble of a softmax and a region-based configuration on a folder of two scans: both
    get labels and region probabilities (the mean of the members' region probabilities)."""
    from kitsnet.data.synth import make_dataset
    from kitsnet.predict.probabilities import load_probabilities

    cases = make_dataset(tmp_path / "new", 2, seed=98)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "new"), "--out", str(out), "--folds", "0"]
    args += ["--model", "3d_fullres+3d_fullres_regions", "--save-probabilities"]
    assert main(["predict", *args, "--results", str(micro_demo / "results")]) == 0
    for case in cases:
        ref = nib.load(tmp_path / "new" / case / "imaging.nii.gz")
        assert nib.load(out / f"{case}.nii.gz").shape == ref.shape
        probs = load_probabilities(out / f"{case}.npz")
        assert probs.kind == "regions" and probs.n_classes == 3


@pytest.mark.parametrize(
    "model",
    [
        "3d_cascade_fullres",
        "2d+3d_cascade_roi",
        "3d_fullres_regions",
        "3d_fullres+3d_fullres_regions",
    ],
)
def test_predict_equals_the_workflows_prediction_byte_for_byte(
    micro_demo, tmp_path, model, one_torch_thread
):
    """With the workflow's sliding-window settings (best_configuration.json records them: the
    micro config predicts without mirroring, 2 tiles a batch) and its thread count (the
    prediction jobs run on training.threads = 1; oneDNN's 2D convolutions round differently
    on 2 threads), the same labels, byte for byte."""
    case = _fold0_case(micro_demo)
    image = micro_demo / "results/data/demo" / case / "imaging.nii.gz"
    args = ["--input", str(image), "--out", str(tmp_path), "--model", model, "--folds", "0"]
    args += ["--results", str(micro_demo / "results"), "--no-postprocessing"]
    assert main(["predict", *args]) == 0
    ours = nib.load(tmp_path / f"{case}.nii.gz")
    theirs = nib.load(micro_demo / f"results/predictions/{model}/fold_0/{case}.nii.gz")
    assert np.asarray(ours.dataobj).tobytes() == np.asarray(theirs.dataobj).tobytes()
    np.testing.assert_array_equal(ours.affine, theirs.affine)


def test_predict_with_an_unknown_model_lists_the_choices(micro_demo, tmp_path, capsys):
    args = ["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "3d_full"]
    assert main(["predict", *args, "--results", str(micro_demo / "results")]) == 1
    err = capsys.readouterr().err
    assert "--model 3d_full: not a configuration or a pair A+B of" in err and "2d" in err
