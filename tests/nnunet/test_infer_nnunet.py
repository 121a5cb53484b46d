"""Sliding-window prediction against nnU-Net v2's ``nnUNetPredictor``.

Needs the optional ``peer`` extra; skipped without it.  One fixed random-weight network and one
fixed volume go through ``kitsnet.predict.infer.predict_volume`` and through nnU-Net's
``predict_sliding_window_return_logits`` (step 0.5, Gaussian importance, mirroring over all
axes, padding of axes shorter than the patch), 3D and 2D (slice by slice).

nnU-Net accumulates tiles in float16 (``predicted_logits``, Gaussian) to save memory.  Near the
volume's corners the Gaussian weights underflow to float16 subnormals there, and those voxels
are off by up to ~0.5 although the weighting is the same.  So the logic is compared with
nnU-Net's own code made to accumulate in float32 (its module's ``torch.half`` and
``compute_gaussian`` dtype swapped for float32, nothing else), to 1e-3 (measured: ~1e-6); the
unmodified predictor is compared by its segmentation (arg-max agreement) and bulk error.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
import nnunetv2.inference.predict_from_raw_data as nnunet_predict  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import compute_gaussian  # noqa: E402

from kitsnet.model.network import build_network  # noqa: E402
from kitsnet.predict.infer import predict_volume  # noqa: E402
from kitsnet.stages import NUM_CLASSES  # noqa: E402
from tests.reference.nnunet_plans import cpu_predictor  # noqa: E402

INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": True}


pytestmark = [pytest.mark.peer, pytest.mark.usefixtures("one_torch_thread")]


class _TorchFloat32(types.ModuleType):
    """``torch`` as nnU-Net's predictor module sees it, with ``torch.half`` meaning float32."""

    half = torch.float32

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _gaussian_float32(*args, **kwargs):
    return compute_gaussian.__wrapped__(*args, **{**kwargs, "dtype": torch.float32})


def _nnunet_logits(
    net: torch.nn.Module, image: np.ndarray, patch: list[int], monkeypatch, float32: bool
) -> np.ndarray:
    with monkeypatch.context() as m:
        if float32:
            m.setattr(nnunet_predict, "torch", _TorchFloat32("torch"))
            m.setattr(nnunet_predict, "compute_gaussian", _gaussian_float32)
        predictor = cpu_predictor(net, patch, INFERENCE)
        out = predictor.predict_sliding_window_return_logits(torch.from_numpy(image.copy()))
    return out.float().numpy()


@pytest.mark.parametrize(
    ("patch", "shape"),
    [
        # 3D: z shorter than the patch (padded), 3 tiles along y, 2 along x
        ([16, 24, 32], (12, 50, 40)),
        # 2D (predicted slice by slice): x shorter than the patch, 3 tiles along y
        ([32, 24], (3, 50, 20)),
    ],
    ids=["3d", "2d"],
)
def test_sliding_window_matches_nnunet_predictor(patch, shape, monkeypatch) -> None:
    dim = len(patch)
    arch = {
        "dim": dim,
        "features_per_stage": [4, 8, 16],
        "strides": [[1] * dim] + [[2] * dim] * 2,
        "kernel_sizes": [[3] * dim] * 3,
        "deep_supervision": False,
    }
    torch.manual_seed(0)
    net = build_network(arch, 1, NUM_CLASSES).eval()
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    plan = {"num_classes": NUM_CLASSES, "patch_size": patch, "arch": arch}

    ours = predict_volume([net], image, plan, INFERENCE)
    exact = _nnunet_logits(net, image, patch, monkeypatch, float32=True)
    stock = _nnunet_logits(net, image, patch, monkeypatch, float32=False)

    assert ours.shape == exact.shape == (NUM_CLASSES, *shape)
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-3)
    # unmodified nnU-Net (float16 accumulation): same segmentation, small bulk error
    assert np.mean(ours.argmax(0) == stock.argmax(0)) >= 0.99
    assert np.quantile(np.abs(ours - stock), 0.95) < 2e-2
