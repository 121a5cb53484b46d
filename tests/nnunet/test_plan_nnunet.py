"""Plans and splits against nnU-Net v2's own planner and ``generate_crossval_split``.

Needs the optional ``peer`` extra; skipped without it.

Plans: nnU-Net's ``ExperimentPlanner`` runs on a dataset fingerprint of real KiTS21 geometry (the
shapes and spacings of the 12 label maps $KITSNET_KITS21_LABELS points at, read from their headers),
with the target spacing set to the paper's 0.78125 mm and the paper's widths (30 doubling to
320 in 3D, 480 in 2D).  Its plans for 2d, 3d_lowres and 3d_fullres -- spacing, patch, batch,
stages, strides, kernels, batch Dice, and the network it would build -- must equal kitsnet's
``make_plan`` on the same fingerprint with every ``auto`` rule on.  The paper's own plan
(config/kits21.yaml: fixed 128^3 / 512^2 patches, 1.99 mm lowres) must get the topology
nnU-Net's ``get_pool_and_conv_props`` gives for those patches, and nnU-Net's planner with the
target spacings set to the paper's, on the median images the paper reports (528x512x512 at
0.78 mm, 207x201x201 at 1.99 mm), chooses exactly those patch and batch sizes.

Splits: nnU-Net's trainer splits the sorted case identifiers with
``generate_crossval_split(keys, seed=12345, n_splits=5)`` (sklearn KFold, shuffled);
``kitsnet.plan.splits.make_splits`` re-implements it without scikit-learn.
"""

from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: E402
    ExperimentPlanner,
)
from nnunetv2.experiment_planning.experiment_planners.network_topology import (  # noqa: E402
    get_pool_and_conv_props,
)
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402

from kitsnet.model.network import build_network  # noqa: E402
from kitsnet.plan.planner import make_plan  # noqa: E402
from kitsnet.plan.splits import make_splits  # noqa: E402
from tests.reference.nnunet_plans import NNUNET_LABELS, nnunet_network  # noqa: E402

pytestmark = pytest.mark.peer

PLANNED = ("2d", "3d_lowres", "3d_fullres")
FI = {"mean": 100.0, "std": 75.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}


@pytest.fixture(scope="module")
def geometry(kits21_label_maps) -> dict:
    """Shapes and spacings (nibabel order, slices first) of the real KiTS21 label maps."""
    shapes, spacings = [], []
    for maps in kits21_label_maps.values():
        header = nib.load(maps["MAJ"]).header
        shapes.append([int(s) for s in header.get_data_shape()])
        spacings.append([float(z) for z in header.get_zooms()])
    assert len(shapes) == 12
    return {"shapes": shapes, "spacings": spacings}


def _nnunet_planner(tmp_path, monkeypatch, geometry: dict, base: int, cap_2d: int):
    """nnU-Net's ExperimentPlanner over a dataset whose fingerprint is ``geometry``: the folders
    it reads (dataset.json, dataset_fingerprint.json) written under tmp_path, widths set."""
    name = "Dataset999_KiTS21Geometry"
    raw, pre = tmp_path / "raw" / name, tmp_path / "pre" / name
    raw.mkdir(parents=True)
    pre.mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    n = len(geometry["shapes"])
    cases = {
        f"case_{i:05d}": {
            "images": [f"imagesTr/case_{i:05d}_0000.nii.gz"],
            "label": f"labelsTr/case_{i:05d}.nii.gz",
        }
        for i in range(n)
    }
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": NNUNET_LABELS,
        "numTraining": n,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "dataset": cases,
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    fingerprint = {
        "spacings": geometry["spacings"],
        "shapes_after_crop": geometry["shapes"],  # CT: cropping to non-zero keeps everything
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {
            "0": {**FI, "median": 100.0, "min": -1000.0, "max": 2000.0}
        },
    }
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    planner = ExperimentPlanner(name, overwrite_target_spacing=[0.78125] * 3)
    planner.UNet_base_num_features = base
    planner.UNet_max_features_2d = cap_2d
    planner.UNet_max_features_3d = 320
    return planner


def _kitsnet_fp(geometry: dict) -> dict:
    return {**geometry, "foreground_intensity": FI}


def _paper_config() -> dict:
    from tests.conftest import REPO

    return copy.deepcopy(yaml.safe_load((REPO / "config" / "kits21.yaml").read_text()))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _nnunet_network(arch: dict, in_channels: int = 1) -> torch.nn.Module:
    return nnunet_network(arch, in_channels, len(NNUNET_LABELS), allow_init=False)


def _as_lists(x) -> list:
    return [_as_lists(v) for v in x] if isinstance(x, list | tuple | np.ndarray) else int(x)


def test_nnunet_planner_on_real_kits21_geometry_equals_kitsnets_auto_plans(
    tmp_path, monkeypatch, geometry
) -> None:
    planner = _nnunet_planner(tmp_path, monkeypatch, geometry, base=30, cap_2d=480)
    ref = planner.plan_experiment()["configurations"]
    cfg = _paper_config()
    cfg["plan"].update(
        patch_size_3d="auto",
        patch_size_lowres="auto",
        patch_size_2d="auto",
        batch_size_3d="auto",
        batch_size_2d="auto",
        lowres_spacing="auto",
    )
    for name in PLANNED:
        ours, theirs = make_plan(name, _kitsnet_fp(geometry), cfg), ref[name]
        a = theirs["architecture"]["arch_kwargs"]
        assert ours["spacing"] == pytest.approx([float(s) for s in theirs["spacing"]], abs=1e-12)
        assert ours["patch_size"] == _as_lists(theirs["patch_size"]), name
        assert ours["batch_size"] == theirs["batch_size"], name
        assert ours["batch_dice"] == theirs["batch_dice"], name
        assert ours["median_shape"] == [float(v) for v in theirs["median_image_size_in_voxels"]]
        assert ours["arch"]["strides"] == _as_lists(a["strides"]), name
        assert ours["arch"]["kernel_sizes"] == _as_lists(a["kernel_sizes"]), name
        assert ours["arch"]["features_per_stage"] == list(a["features_per_stage"]), name
        with torch.device("meta"):
            net = build_network(ours["arch"], ours["in_channels"], ours["num_classes"])
            assert _n_params(net) == _n_params(_nnunet_network(theirs["architecture"])), name


def test_papers_plans_get_nnunets_topology_and_the_patches_nnunet_plans_for_the_paper(
    tmp_path, monkeypatch, geometry
) -> None:
    """config/kits21.yaml on real geometry: nnU-Net's topology for the paper's patches (6 stages
    in 3D, 8 in 2D), and the patches are what nnU-Net's planner chooses for the paper's medians."""
    cfg = _paper_config()
    plans = {c: make_plan(c, _kitsnet_fp(geometry), cfg) for c in PLANNED}
    planner = _nnunet_planner(tmp_path, monkeypatch, geometry, base=32, cap_2d=512)
    paper_median = {"3d_fullres": (528, 512, 512), "3d_lowres": (207, 201, 201), "2d": (512, 512)}
    cache: dict = {}
    for name, plan in plans.items():
        _, pool, conv, patch, _ = get_pool_and_conv_props(
            plan["spacing"], plan["patch_size"], 4, 999999
        )
        assert plan["arch"]["strides"] == _as_lists(pool), name
        assert plan["arch"]["kernel_sizes"] == _as_lists(conv), name
        assert plan["patch_size"] == _as_lists(patch), name
        median = np.array(paper_median[name], dtype=float)
        theirs = planner.get_plans_for_configuration(
            np.array(plan["spacing"]), median, name, float(np.prod(median) * 300), cache
        )
        assert plan["patch_size"] == _as_lists(theirs["patch_size"]), name
        assert plan["batch_size"] == theirs["batch_size"], name
        a = theirs["architecture"]
        assert plan["arch"]["strides"] == _as_lists(a["arch_kwargs"]["strides"]), name
        # nnU-Net's network for that topology, with the paper's widths (v2 plans 32 -> 320/512)
        a = copy.deepcopy(a)
        a["arch_kwargs"]["features_per_stage"] = plan["arch"]["features_per_stage"]
        with torch.device("meta"):
            ours = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
            assert _n_params(ours) == _n_params(_nnunet_network(a)), name
    assert [len(plans[c]["arch"]["strides"]) for c in PLANNED] == [8, 6, 6]


@pytest.mark.parametrize("n", [5, 7, 10, 13, 24, 300])
def test_splits_equal_nnunets(n: int) -> None:
    # KiTS21 ids, given out of order: both sides split the sorted list
    cases = [f"case_{i:05d}" for i in range(n)][::-1]
    ref = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
    ours = make_splits(cases, n_folds=5, seed=12345)
    assert ours == [{"train": list(s["train"]), "val": list(s["val"])} for s in ref]


@pytest.mark.parametrize(("n", "folds", "seed"), [(11, 3, 0), (23, 4, 7)])
def test_splits_equal_nnunets_for_other_folds_and_seeds(n: int, folds: int, seed: int) -> None:
    cases = [f"case_{i:05d}" for i in range(n)]
    ref = generate_crossval_split(cases, seed=seed, n_splits=folds)
    assert make_splits(cases, folds, seed) == [
        {"train": list(s["train"]), "val": list(s["val"])} for s in ref
    ]
