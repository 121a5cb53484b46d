"""The Snakemake workflow: the paper's DAG (dry run) and the micro demo end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_workflow

from kitsnet.data.synth import kits_affine
from kitsnet.evaluate.metrics import METRIC_COLUMNS

# the paper's (config/kits21.yaml) and the micro demo's configurations
CONFIGS = [
    "2d",
    "3d_fullres",
    "3d_lowres",
    "3d_cascade_fullres",
    "3d_cascade_roi",
    "3d_fullres_regions",
]


def snakemake(repo: Path, workdir: Path, *args: str, check: bool = True):
    """Run the repository's workflow from ``workdir`` (conftest.run_workflow)."""
    return run_workflow(workdir, *args, check=check)


@pytest.fixture(scope="module")
def kits_layout(tmp_path_factory) -> Path:
    """Ten cases in KiTS21's real layout and format (tiny volumes; a dry run reads none)."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("kits21") / "data"
    for i in range(10):
        case = root / f"case_{i:05d}"
        case.mkdir(parents=True)
        aff = kits_affine((3.0, 0.8, 0.8))
        img = np.full((4, 8, 8), -1000, np.int16)
        nib.save(nib.Nifti1Image(img, aff), case / "imaging.nii.gz")
        nib.save(
            nib.Nifti1Image(np.zeros((4, 8, 8), np.uint8), aff), case / "aggregated_MAJ_seg.nii.gz"
        )
    return root


def test_paper_dag_plans_30_gpu_training_jobs(repo, tmp_path, kits_layout):
    proc = snakemake(
        repo,
        tmp_path,
        "-n",
        "--configfile",
        str(repo / "config/kits21.yaml"),
        "--config",
        f"data_root={kits_layout}",
        "--",
        "results/table1.csv",
    )
    out = proc.stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert counts["train"] == "30"  # 6 configurations x 5 folds
    assert int(counts["predict"]) + int(counts["predict_lowres"]) == 30
    assert counts["evaluate"] == "30" and counts["preprocess"] == "30"  # 10 cases x 3 grids
    assert counts["crop_roi"] == "10"  # 3d_cascade_roi: each case cropped once
    assert "synth" not in counts
    blocks = out.split("\nrule ")
    train_blocks = [b for b in blocks if b.startswith("train:")]
    assert len(train_blocks) == 30
    for cfg in CONFIGS:
        for fold in range(5):
            assert any(
                f"results/models/{cfg}/fold_{fold}/model_final.pt" in b for b in train_blocks
            )
    assert all(re.search(r"resources:.*\bgpu=1\b", b) for b in train_blocks)
    cpu_blocks = [
        b
        for b in blocks
        if b.split(":")[0] in ("fingerprint", "preprocess", "crop_roi", "evaluate", "table1")
    ]
    assert cpu_blocks and not any(re.search(r"\bgpu=", b) for b in cpu_blocks)


def test_unknown_config_key_stops_before_any_job(repo, tmp_path):
    proc = snakemake(repo, tmp_path, "-n", "--config", "epochz=3", check=False)
    assert proc.returncode != 0
    assert "epochz" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_micro_demo_with_directory_on_scratch_writes_nothing_into_the_checkout(micro_demo_run):
    """``snakemake --directory /scratch/...`` from the checkout: every workflow file is found
    beside the Snakefile, every output lands in the working directory."""
    work = micro_demo_run["workdir"]
    assert (work / "results" / "table1.csv").is_file() and (work / ".snakemake").is_dir()
    if micro_demo_run["before"] is None:
        pytest.skip("not a git checkout: cannot list what changed in it")
    assert micro_demo_run["after"] == micro_demo_run["before"]


@pytest.mark.workflow
def test_micro_demo_runs_end_to_end(repo, micro_demo):
    """Synthetic data -> validate -> plan -> preprocess -> 30 trainings -> predictions ->
    scores -> Table 1 and figures, with micro settings (a few tiny cases and iterations).
    The run itself is the session fixture ``micro_demo`` (conftest.py), shared with
    test_determinism.py."""
    tmp_path = micro_demo
    res = tmp_path / "results"
    with open(res / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == CONFIGS
    for r in rows:
        for key in METRIC_COLUMNS:
            assert 0.0 <= float(r[key]) <= 1.0
    per_case = list(csv.DictReader(open(res / "scores_per_case.csv")))
    assert len(per_case) == len(CONFIGS) * 6 * 6  # configurations x cases x metrics
    for fig in ("fig1_reference.png", "fig2_predictions.png", "training_curves.png"):
        assert (res / "figures" / fig).stat().st_size > 1000
    for cfg in CONFIGS:
        for fold in range(5):
            assert (res / f"models/{cfg}/fold_{fold}/progress.png").is_file()
            assert (res / f"benchmarks/train/{cfg}_fold{fold}.tsv").is_file()
    # predictions are on the original grid of their case, with its geometry
    import nibabel as nib

    for cfg in ("3d_cascade_fullres", "3d_cascade_roi"):
        pred = next((res / f"predictions/{cfg}").glob("fold_*/case_*.nii.gz"))
        ref = nib.load(res / "data/demo" / pred.name.removesuffix(".nii.gz") / "imaging.nii.gz")
        got = nib.load(pred)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.affine, ref.affine)
    # 3d_cascade_roi's cases: each cropped once, to the lowres stage's region, one item per box
    for case_dir in sorted((res / "preprocessed/3d_cascade_roi").iterdir()):
        manifest = json.loads((case_dir / "roi.json").read_text())
        assert manifest["items"] == ["box0"]  # the default: one box around both kidneys
        crop = np.load(case_dir / "box0_seg.npy", mmap_mode="r")
        assert crop.shape == tuple(
            np.subtract(manifest["boxes"][0]["stop"], manifest["boxes"][0]["start"])
        )
        assert all(c <= f for c, f in zip(crop.shape, manifest["shape"], strict=True))
    _model_selection_covers_every_configuration_and_pair(res)
    _region_based_row_is_tested_against_its_label_based_base(res)
    # a second invocation finds nothing to do
    again = snakemake(repo, tmp_path, "-n", "--configfile", str(repo / "tests/data/micro.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr


def _model_selection_covers_every_configuration_and_pair(res):
    """results/model_selection.csv: every configuration and every pair, without and with its
    postprocessing; best_configuration.json is its arg-max; the compact probabilities of every
    fold sum to one."""
    from kitsnet.predict.probabilities import load_probabilities

    pairs = [f"{a}+{b}" for i, a in enumerate(CONFIGS) for b in CONFIGS[i + 1 :]]
    rows = list(csv.DictReader(open(res / "model_selection.csv")))
    assert [(r["model"], r["postprocessed"]) for r in rows] == [
        (m, pp) for m in CONFIGS + pairs for pp in ("false", "true")
    ]
    for r in rows:
        six = [float(r[k]) for k in METRIC_COLUMNS]
        assert float(r["kits_score"]) == pytest.approx(sum(six) / 6, abs=1e-5)
    best = json.loads((res / "best_configuration.json").read_text())
    top = max(rows, key=lambda r: float(r["kits_score"]))
    assert (best["model"], str(best["postprocessed"]).lower()) == (
        top["model"],
        top["postprocessed"],
    )
    assert best["configurations"] == best["model"].split("+")
    for model in CONFIGS + pairs:
        decision = json.loads((res / f"postprocessing/{model}.json").read_text())
        assert decision["model"] == model and len(decision["candidates"]) >= 7
    assert "## Model selection" in (res / "table1.md").read_text()
    npz = next((res / "probabilities/3d_cascade_fullres").glob("fold_*/case_*.npz"))
    probs = load_probabilities(npz).dense()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def _region_based_row_is_tested_against_its_label_based_base(res):
    """3d_fullres_regions: a sigmoid network over 3 regions, region probabilities on disk, a
    p-value against 3d_fullres for every metric in table1_stats.csv, and the mixed ensemble
    scored in model_selection.csv."""
    from kitsnet.model.checkpoint import load_checkpoint
    from kitsnet.predict.probabilities import load_probabilities

    plan = json.loads((res / "plans/3d_fullres_regions.json").read_text())
    assert plan["regions"] == [[1, 2, 3], [2, 3], [2]] and plan["regions_class_order"] == [1, 3, 2]
    state = load_checkpoint(res / "models/3d_fullres_regions/fold_0/model_final.pt")
    heads = [v for k, v in state["state_dict"].items() if "seg_layers" in k and "weight" in k]
    assert heads and all(h.shape[0] == 3 for h in heads)  # one output per region
    npz = next((res / "probabilities/3d_fullres_regions").glob("fold_*/case_*.npz"))
    probs = load_probabilities(npz)
    assert probs.kind == "regions" and probs.n_classes == 3
    stats = list(csv.DictReader(open(res / "table1_stats.csv")))
    region_rows = [r for r in stats if r["model"] == "3d_fullres_regions"]
    assert len(region_rows) == len(METRIC_COLUMNS)
    assert all(0 <= float(r["p_vs_labels"]) <= 1 for r in region_rows)
    assert all(r["p_vs_labels"] == "" for r in stats if r["model"] == "3d_fullres")
    models = {r["model"] for r in csv.DictReader(open(res / "model_selection.csv"))}
    assert "3d_fullres+3d_fullres_regions" in models


@pytest.mark.workflow
def test_report_html_has_table1_figures_curves_and_compute_cost(repo, micro_demo, tmp_path):
    """`snakemake --report` after the micro demo: one self-contained HTML file with Table 1, the
    figures, the training curves and the compute-cost table, with their captions.  (Written to
    tmp_path: the shared micro_demo folder stays as the run left it, apart from snakemake's log.)"""
    cost = list(csv.DictReader(open(micro_demo / "results/compute_cost.csv")))
    assert [(r["configuration"], r["fold"], r["step"]) for r in cost] == [
        (c, str(f), s) for c in CONFIGS for f in range(5) for s in ("train", "predict")
    ]
    assert all(float(r["wall_s"]) > 0 and float(r["gpu_hours"]) > 0 for r in cost)
    out = tmp_path / "report.html"
    micro = str(repo / "tests/data/micro.yaml")
    snakemake(repo, micro_demo, "--configfile", micro, "--report", str(out))
    html = out.read_text()
    assert len(html) > 100_000
    for caption in (
        "Table 1: Dice and Surface Dice",
        "Figure 1: sample axial slices",
        "Figure 2: the same slices",
        "Training curves of every configuration",
        "Compute cost of every training and prediction job",
        "Model selection after cross-validation",
        # the workflow's description on the landing page (rules/report/workflow.rst)
        "reproduces Table 1 of",
    ):
        assert caption in html, caption
    for name in (
        "table1.csv",
        "compute_cost.csv",
        "fig1_reference.png",
        "training_curves.png",
        "model_selection.csv",
    ):
        assert name in html, name
    # self-contained: no stylesheet or script is loaded from elsewhere
    assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?://", html)
