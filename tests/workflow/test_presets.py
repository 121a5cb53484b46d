"""Which experiment runs, and where it may write: the demo and the paper's settings are presets
that user config files are layered on, a data root the user owns is never written to, and the
paper's 300-case run on SLURM submits few, batched jobs."""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, kits_tree, run_workflow


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (folders: '')."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def _profile_dry_run(tmp_path: Path, root: Path) -> subprocess.CompletedProcess:
    """``snakemake -n --profile slurm --configfile my.yaml`` with my.yaml holding only
    ``data_root``, as a user adds their data to the paper's run."""
    user = tmp_path / "my.yaml"
    user.write_text(f"data_root: {root}\n")
    work = tmp_path / "work"
    work.mkdir()
    args = ["-n", "--profile", str(REPO / "slurm"), "--configfile", str(user)]
    return run_workflow(work, *args, "--", "results/table1.csv", check=False)


@pytest.fixture
def real_root(tmp_path) -> Path:
    return kits_tree(tmp_path / "kits21" / "data", 10, missing="case_00003/imaging.nii.gz")


@pytest.mark.parametrize(
    "how",
    ["demo config + data_root", "profile + --config data_root", "profile + --configfile"],
)
def test_a_real_data_root_with_a_missing_file_is_never_written_to(tmp_path, real_root, how):
    """The demo's settings generate synthetic cases, but only under results/: a data_root the
    user owns stops the run with the conflict named; with the paper's settings the missing file
    is reported.  Either way the folder is left byte for byte as it was."""
    before = _snapshot(real_root)
    work = tmp_path / "work"
    work.mkdir()
    user = tmp_path / "my.yaml"
    user.write_text(f"data_root: {real_root}\n")
    args = {
        "demo config + data_root": ["--cores", "1", "--config", f"data_root={real_root}"],
        # a --config replaces the profile's preset=paper: the demo's settings are left
        "profile + --config data_root": [
            "--profile",
            str(REPO / "slurm"),
            "--config",
            f"data_root={real_root}",
        ],
        # a --configfile is layered on the profile's preset=paper
        "profile + --configfile": ["--profile", str(REPO / "slurm"), "--configfile", str(user)],
    }[how]
    proc = run_workflow(work, *args, "--", "results/table1.csv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    if how == "profile + --configfile":
        assert "case_00003" in out and "imaging.nii.gz" in out, out[-3000:]
    else:
        assert "outside results/" in out and "preset: paper" in out, out[-3000:]
    assert _snapshot(real_root) == before
    assert not (work / "results" / "data").exists()


def test_profile_with_a_configfile_of_only_data_root_plans_the_papers_settings(tmp_path):
    root = kits_tree(tmp_path / "data", 10)
    proc = _profile_dry_run(tmp_path, root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert counts["train"] == "30" and "synth" not in counts
    train = [b for b in proc.stdout.split("\nrule ") if b.startswith("train:")]
    # the paper's resources (config/kits21.yaml), one GPU each
    for cfg, mem, runtime in (("3d_fullres", 64000, 4320), ("2d", 32000, 1440)):
        block = next(b for b in train if f"models/{cfg}/fold_0/" in b)
        assert f"mem_mb={mem}," in block and f"runtime={runtime}," in block, block
        assert re.search(r"\bgpu=1\b", block), block


@pytest.mark.slow  # a dry run of the 300-case DAG: ~30 s
def test_a_300_case_paper_run_submits_at_most_100_sbatch_jobs(tmp_path):
    """Dry run of the SLURM profile over a 300-case KiTS21 tree: every group job and every
    job outside a group (local rules aside) is one sbatch submission."""
    root = kits_tree(tmp_path / "data", 300)
    proc = _profile_dry_run(tmp_path, root)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert counts["preprocess"] == "900" and counts["train"] == "30"
    assert counts["crop_roi"] == "300" and counts["evaluate"] == "30"
    groups = re.findall(r"Group job (\w+)", out)
    single = re.findall(r"^rule (\w+):", out, flags=re.M)  # not indented: not in a group
    assert counts["ensemble"] == "15" and counts["postprocess"] == "21"
    assert Counter(groups) == {
        "preprocessing": 20,
        "roi_crops": 3,
        "evaluation": 5,
        "selection": 6,
    }
    assert not {"preprocess", "crop_roi", "evaluate", "ensemble", "postprocess"} & set(single)
    local = {"plan", "splits", "table1", "training_curves", "compute_cost", "model_selection"}
    submissions = len(groups) + len([r for r in single if r not in local])
    assert submissions <= 100, (len(groups), sorted(set(single)))
    assert submissions == 96  # README: 96 sbatch jobs for results/table1.csv
    # the paper's 6 configurations: each training its own job, with its GPU
    assert single.count("train") == 30
    assert single.count("predict") + single.count("predict_lowres") == 30
