"""kitsnet.model.network against nnU-Net v2's own network, built from the same plan.

Needs the optional ``peer`` extra (``pip install torch==2.13.0 -e '.[peer]'``); skipped without
it.  The plans are made by ``kitsnet.plan.planner.make_plan`` from ``config/kits21.yaml`` and
translated (``tests.reference.nnunet_plans``) into the ``architecture`` entry that nnU-Net's
ExperimentPlanner writes to its plans file; nnU-Net then builds its network from that with
``get_network_from_plans``, as its trainer does.

* Every configuration of the paper's plan: equal parameter counts (built on the ``meta`` device,
  so a 2D network of tens of millions of parameters costs nothing).
* The same plans with narrow widths (base 4, cap 32; ``make_plan`` again): nnU-Net's state dict
  loads into our network and both give the same logits, with and without deep supervision.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from kitsnet.model.network import build_network  # noqa: E402
from kitsnet.plan.planner import make_plan  # noqa: E402
from kitsnet.stages import CONFIGURATIONS  # noqa: E402
from tests.reference.nnunet_plans import (  # noqa: E402
    nnunet_architecture,
    nnunet_network,
    without_aliases,
)

REPO = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.peer, pytest.mark.usefixtures("one_torch_thread")]


def _fingerprint() -> dict:
    """Enough of a fingerprint for make_plan (kits21.yaml fixes both spacings)."""
    fi = {"mean": 100.0, "std": 75.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}
    return {"shapes": [[100, 512, 512]], "spacings": [[1.0, 0.8, 0.8]], "foreground_intensity": fi}


def _plans(**plan_overrides) -> dict[str, dict]:
    cfg = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["plan"].update(plan_overrides)
    return {c: make_plan(c, _fingerprint(), cfg) for c in CONFIGURATIONS}


def _nnunet(plan: dict) -> torch.nn.Module:
    return nnunet_network(
        nnunet_architecture(plan["arch"]),
        plan["in_channels"],
        plan["num_classes"],
        deep_supervision=plan["arch"]["deep_supervision"],
    )


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_papers_plans_match_nnunet() -> None:
    plans = _plans()
    counts = {}
    with torch.device("meta"):
        for name, plan in plans.items():
            ours = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
            counts[name] = (_n_params(ours), _n_params(_nnunet(plan)))
    assert all(o == r for o, r in counts.values()), counts
    # the cascade's 3 extra input channels add 3 x 27 x 30 weights to the first convolution
    assert counts["3d_cascade_fullres"][0] - counts["3d_fullres"][0] == 3 * 27 * 30


@pytest.mark.parametrize("configuration", ["2d", "3d_cascade_fullres"])
def test_narrow_plan_networks_compute_nnunets_logits(configuration: str) -> None:
    plan = _plans(base_features=4, max_features_3d=32, max_features_2d=32)[configuration]
    torch.manual_seed(0)
    ref = _nnunet(plan).eval()
    ours = build_network(plan["arch"], plan["in_channels"], plan["num_classes"]).eval()
    assert _n_params(ours) == _n_params(ref)

    # without nnU-Net's aliases of its layers, the keys must be exactly ours
    ours.load_state_dict(without_aliases(ref.state_dict()), strict=True)

    # small input the plan's strides allow: 2 voxels per axis at the bottleneck (InstanceNorm
    # needs more than one)
    size = [2] * plan["arch"]["dim"]
    for stride in plan["arch"]["strides"]:
        size = [s * st for s, st in zip(size, stride, strict=True)]
    x = torch.randn(1, plan["in_channels"], *size)
    with torch.no_grad():
        for ds in (True, False):
            ref.decoder.deep_supervision = ds
            ours.deep_supervision = ds
            expected, got = ref(x), ours(x)
            if not ds:
                # nnU-Net returns a bare tensor without deep supervision as well.
                expected, got = [expected], [got]
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e)


def test_pinned_counts_in_test_network_are_nnunets() -> None:
    """tests/unit/model/test_network.py pins counts for CI runs without nnU-Net; keep them true."""
    from kitsnet.plan.planner import features_per_stage

    expected = {(3, 30, 320, 6, 1): 29_696_840, (3, 30, 320, 6, 4): 29_699_270}
    expected[(2, 30, 480, 8, 1)] = 40_720_708
    with torch.device("meta"):
        for (dim, base, cap, n, in_channels), count in expected.items():
            arch = {
                "dim": dim,
                "features_per_stage": features_per_stage(base, cap, n),
                "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                "kernel_sizes": [[3] * dim] * n,
                "n_conv_per_stage": 2,
                "n_conv_per_stage_decoder": 2,
                "deep_supervision": True,
            }
            plan = {"arch": arch, "in_channels": in_channels, "num_classes": 4}
            assert _n_params(_nnunet(plan)) == count
