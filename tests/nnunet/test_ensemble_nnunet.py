"""Ensembles from compact probabilities against nnU-Net v2's own export and ensembling.

Needs the optional ``peer`` extra; skipped without it.  Two members (3d_fullres-like logits at
0.78 mm, 3d_lowres-like at 1.6 mm) of one case go

* through nnU-Net: ``export_prediction_from_logits(save_probabilities=True)`` writes each
  member's float32 probabilities on the original grid as its ``.npz`` (``probabilities``), then
  its ``average_probabilities`` and ``LabelManager.convert_probabilities_to_segmentation`` (what
  ``merge_files`` of ``nnUNetv2_ensemble`` does) give the ensemble;
* through kitsnet: ``export_logits`` -> compact probabilities -> ``ensemble_argmax``.

Expected: the arg-max of the ensemble agrees on >= 99.99% of voxels, and the averaged
probabilities differ by at most 1/255 (the quantisation) + 1e-5 (float32 resampling).  And on the
quantised values themselves (our ``dense()`` written as nnU-Net's ``.npz``) nnU-Net's averaging
gives exactly our ensemble: it is nnU-Net's ensembling on the compact probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from conftest import smooth_noise  # noqa: E402
from nnunetv2.ensembling.ensemble import average_probabilities  # noqa: E402
from nnunetv2.inference.export_prediction import export_prediction_from_logits  # noqa: E402

from kitsnet.predict.averaging import average, ensemble_argmax  # noqa: E402
from kitsnet.predict.probabilities import export_logits  # noqa: E402
from tests.reference.nnunet_plans import dataset_json, plans_manager  # noqa: E402

pytestmark = [pytest.mark.peer, pytest.mark.usefixtures("one_torch_thread")]

NORMALIZATION = {"clip": [-79.0, 304.0], "mean": 101.0, "std": 76.9}
# member name -> (configuration, its grid's spacing, its logits' shape) for an original grid of
# 64 x 0.8 mm (in-plane) and 30 x 3 mm (anisotropic: nearest along the slices) or 1 mm slices
MEMBERS = [("3d_fullres", 0.78125), ("3d_lowres", 1.6)]
ORIGINALS = {
    "3mm_slices": ((3.0, 0.8, 0.8), (30, 96, 90)),
    "1mm_slices": ((1.0, 0.8, 0.8), (70, 96, 90)),
}


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
        out[c] = _field(shape, rng) - 4 + 13 * blob
    return out


def _plan(configuration: str, spacing: float) -> dict:
    return {
        "configuration": configuration,
        "spacing": [spacing] * 3,
        "patch_size": [32, 32, 32],
        "normalization": NORMALIZATION,
        "anisotropy_threshold": 3.0,
    }


def _nnunet_export(logits, plan, spacing, shape, out_truncated: str) -> None:
    """nnU-Net's export of one member: its segmentation and its --save_probabilities .npz."""
    pm = plans_manager(plan)
    props = {
        "spacing": list(spacing),
        "shape_before_cropping": list(shape),
        "shape_after_cropping_and_before_resampling": list(shape),
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "sitk_stuff": {
            "spacing": spacing[::-1],
            "origin": (0.0,) * 3,
            "direction": np.eye(3).ravel(),
        },
    }
    export_prediction_from_logits(
        logits,
        props,
        pm.get_configuration(plan["configuration"]),
        pm,
        dataset_json(),
        out_truncated,
        save_probabilities=True,
        num_threads_torch=1,
    )


@pytest.fixture(scope="module", params=list(ORIGINALS))
def ensembles(request, tmp_path_factory):
    """nnU-Net's npz files and our compact members of one original grid."""
    spacing, shape = ORIGINALS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    files, compact = [], []
    for seed, (configuration, grid) in enumerate(MEMBERS):
        source = [round(n * s / grid) for n, s in zip(shape, spacing, strict=True)]
        logits = member_logits(source, seed)
        plan = _plan(configuration, grid)
        (tmp / configuration).mkdir()
        _nnunet_export(logits, plan, spacing, shape, str(tmp / configuration / "case_00000"))
        files.append(str(tmp / configuration / "case_00000.npz"))
        compact.append(export_logits(logits, shape, plan["spacing"], 3.0, spacing)[1])
    return files, compact, tmp


def test_ensemble_agrees_with_nnunets_average_probabilities(ensembles):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    files, compact, _ = ensembles
    avg = average_probabilities(files)
    ref = LabelManager(dataset_json()["labels"], None).convert_probabilities_to_segmentation(avg)
    ours = ensemble_argmax(compact)
    assert ours.shape == ref.shape and (ref > 0).any()
    assert (ours == ref).mean() >= 0.9999
    box, mean = average(compact)
    inside = (slice(None), *(slice(lo, hi) for lo, hi in box))
    assert np.abs(mean - avg[inside]).max() <= 1 / 255 + 1e-5
    outside = np.ones(ref.shape, bool)
    outside[inside[1:]] = False
    assert outside.any() and np.abs(avg[1:][:, outside]).max() <= 1 / (2 * 255)


def test_nnunet_averaging_the_quantised_values_gives_exactly_our_ensemble(ensembles):
    files, compact, tmp = ensembles
    dense = []
    for i, cp in enumerate(compact):
        dense.append(str(tmp / f"dense_{i}.npz"))
        np.savez_compressed(dense[-1], probabilities=cp.dense())
    avg = average_probabilities(dense)
    np.testing.assert_array_equal(ensemble_argmax(compact), avg.argmax(0))
    box, mean = average(compact)
    np.testing.assert_array_equal(mean, avg[(slice(None), *(slice(lo, hi) for lo, hi in box))])


def test_each_members_probabilities_are_nnunets_within_one_quantisation_step(ensembles):
    files, compact, _ = ensembles
    for path, cp in zip(files, compact, strict=True):
        with np.load(path) as z:
            theirs = z["probabilities"]
        assert theirs.dtype == np.float32 and theirs.shape == (4, *cp.shape)
        assert np.abs(cp.dense() - theirs).max() <= 1 / 255 + 1e-5
