"""Patch boxes and sampled regions against nnU-Net v2's own data loader and trainer.

Needs the optional ``peer`` extra; skipped without it.  ``nnUNetDataLoader.get_bbox`` (called
as nnU-Net's loader calls it, on an object holding the attributes it reads) and kitsnet's
``PatchSampler.box`` draw thousands of boxes on the same shapes, random and foreground-forced:
the lowest and highest start per axis must be equal, and forced boxes the same set.  Shapes
include an axis shorter than the sampled region and 2D plans (one slice along axis 0), and the
regions are the ones nnU-Net's trainer computes (``get_patch_size``) for the paper's patches.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from nnunetv2.training.data_augmentation.compute_initial_patch_size import (  # noqa: E402
    get_patch_size,
)
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: E402

from kitsnet.train.loader import PatchSampler, region_size  # noqa: E402

pytestmark = pytest.mark.peer

DRAWS = 4000
# (shape of the preprocessed case, final patch, rotation in degrees; 2D patches have 2 axes)
CASES = [
    ((300, 250, 180), [128, 128, 128], 30.0),  # the paper's 3D patch; axis 2 < the 205 region
    ((140, 150, 160), [112, 160, 128], 30.0),  # nnU-Net's auto patch on KiTS21 geometry
    ((40, 60, 70), [32, 32, 32], 30.0),  # the demo's
    ((80, 512, 496), [512, 512], 180.0),  # the paper's 2D patch, slices along axis 0
    ((30, 90, 100), [64, 64], 180.0),  # the demo's 2D patch
]


def _region(patch: list[int], deg: float) -> list[int]:
    dim = len(patch)
    key = "rotation_deg_2d" if dim == 2 else "rotation_deg"
    ours = region_size(patch, {"rotation_p": 0.2, "scale_p": 0.2, key: deg}, dim)
    rad = (-np.radians(deg), np.radians(deg))
    assert ours == [int(v) for v in get_patch_size(patch, rad, rad, rad, (0.85, 1.25))]
    return ours


def _locations(shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """A few voxels per class: corners (where clipping matters) and the middle; no cyst."""
    last = [s - 1 for s in shape]
    mid = [s // 2 for s in shape]
    return {
        1: np.array([[0, 0, 0], last, [0, last[1], 3]]),
        2: np.array([mid, [last[0], 2, mid[2]]]),
        3: np.zeros((0, 3), dtype=np.int64),
    }


def _nnunet_starts(shape, region, patch, force_fg: bool, locs, seed: int) -> np.ndarray:
    """Box starts from nnU-Net's get_bbox; 2D as its loader does it (patch (1, *patch))."""
    if len(patch) == 2:
        region, patch = [1, *region], [1, *patch]
    loader = SimpleNamespace(
        need_to_pad=(np.array(region) - np.array(patch)).astype(int),
        patch_size=list(region),
        has_ignore=False,
        annotated_classes_key=(-1, 1, 2, 3),
    )
    # nnU-Net keeps a leading channel coordinate in its class locations
    with_channel = {k: np.concatenate([np.zeros((len(v), 1), int), v], 1) for k, v in locs.items()}
    np.random.seed(seed)
    return np.array(
        [
            nnUNetDataLoader.get_bbox(loader, np.array(shape), force_fg, with_channel)[0]
            for _ in range(DRAWS)
        ]
    )


def _kitsnet_starts(shape, region, patch, force_fg: bool, locs, seed: int) -> np.ndarray:
    store = SimpleNamespace(
        cases=["case_00000"],
        seg={"case_00000": np.broadcast_to(np.uint8(0), shape)},
        locs={"case_00000": locs},
    )
    sampler = PatchSampler(store, region, patch, len(patch), 0.33, np.random.default_rng(seed))
    return np.array([sampler.box("case_00000", force_fg) for _ in range(DRAWS)])


@pytest.mark.parametrize(("shape", "patch", "deg"), CASES)
def test_random_boxes_span_the_same_range_as_nnunets_get_bbox(shape, patch, deg) -> None:
    region = _region(patch, deg)
    ref = _nnunet_starts(shape, region, patch, False, _locations(shape), 0)
    ours = _kitsnet_starts(shape, region, patch, False, _locations(shape), 0)
    assert ours.min(0).tolist() == ref.min(0).tolist()
    assert ours.max(0).tolist() == ref.max(0).tolist()


@pytest.mark.parametrize(("shape", "patch", "deg"), CASES)
def test_foreground_boxes_are_nnunets_get_bbox_boxes(shape, patch, deg) -> None:
    region = _region(patch, deg)
    locs = _locations(shape)
    ref = _nnunet_starts(shape, region, patch, True, locs, 1)
    ours = _kitsnet_starts(shape, region, patch, True, locs, 1)
    assert ours.min(0).tolist() == ref.min(0).tolist()
    assert ours.max(0).tolist() == ref.max(0).tolist()
    assert {tuple(b) for b in ours.tolist()} == {tuple(b) for b in ref.tolist()}
