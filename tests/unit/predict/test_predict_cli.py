"""`kitsnet predict`: a trained configuration (5-fold ensemble, cascade included) on new scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from kitsnet.cli import main


@pytest.mark.workflow
def test_kitsnet_predict_runs_the_cascade_ensemble_on_a_new_scan(micro_demo, tmp_path):
    models = micro_demo / "results" / "models"
    image = micro_demo / "results" / "data" / "demo" / "case_00001" / "imaging.nii.gz"
    rc = main(
        [
            "predict",
            "--models",
            str(models),
            "--input",
            str(image),
            "--out",
            str(tmp_path),
            "--config",
            "3d_cascade_fullres",
            "--no-mirror",
        ]
    )
    assert rc == 0
    pred, ref = nib.load(tmp_path / "case_00001.nii.gz"), nib.load(image)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    np.testing.assert_allclose(pred.header.get_zooms(), ref.header.get_zooms())
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def test_kitsnet_predict_without_models_names_the_folder(tmp_path, capsys):
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 8, 8), np.int16), np.eye(4)), image)
    rc = main(
        [
            "predict",
            "--models",
            str(tmp_path / "none"),
            "--input",
            str(image),
            "--out",
            str(tmp_path / "out"),
            "--config",
            "3d_fullres",
        ]
    )
    assert rc == 1
    assert "none/3d_fullres" in capsys.readouterr().err
