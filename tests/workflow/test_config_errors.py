"""Config mistakes stop the workflow in a few lines that say what to do: a misspelt key is named
with its section and the nearest valid key, a wrong value with what is expected, a missing
data_root with the file or flag that set it, the folder it was resolved to and the commands that
fetch KiTS21.  A relative data_root is read from the folder snakemake was started in, also with
--directory (the README's run on scratch storage), while synthetic data stays in the working
directory's results/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import REPO, kits_tree, run_workflow

# Snakemake's whole output for a config error, header and traceback lines included
MAX_LINES = 12


def _snakemake(launch: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A dry run of this repository's Snakefile started in ``launch``, as from a shell there."""
    launch.mkdir(parents=True, exist_ok=True)
    return run_workflow(launch, "-n", *args, check=False, env=env, timeout=300)


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("where", ["nested, --configfile", "top level, --config"])
def test_a_config_typo_is_named_with_its_section_and_nearest_key(tmp_path, where):
    """83 (nested) and 755 (top-level) lines of schema and config dump before; now the key path,
    the nearest valid key and the file or flag that holds the typo, in a few lines."""
    if where.startswith("nested"):
        typo = tmp_path / "typo.yaml"
        typo.write_text("training:\n  epochz: 3\n")
        proc = _snakemake(tmp_path, "--configfile", str(typo))
        wanted = [
            "training.epochz: unknown key",
            "did you mean 'epochs'?",
            "--configfile typo.yaml",
        ]
    else:
        proc = _snakemake(tmp_path, "--config", "epochz=3")
        wanted = ["epochz: unknown key", "did you mean 'training.epochs'?", "(--config)"]
    out = _output(proc)
    assert proc.returncode != 0
    assert all(w in out for w in wanted), out[-3000:]
    assert len(out.splitlines()) <= MAX_LINES, out[-3000:]
    # no dump of the schema (its keywords) or of the merged config (keys the user did not touch)
    assert "additionalProperties" not in out and "ema_alpha" not in out, out[-3000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "args, wanted",
    [
        (["--config", "folds=two"], ["folds: 'two' is not valid", "expected an integer >= 2"]),
        (["--config", "seed=-1"], ["seed: -1 is not valid", "expected an integer >= 0"]),
        (
            ["--config", "configurations=[3d_fullress]"],
            ["configurations[0]: '3d_fullress'", "did you mean '3d_fullres'?"],
        ),
        # Snakemake's --config reads True/False as booleans, not true/false
        (["--config", "fetch_imaging=true"], ["fetch_imaging: 'true'", "fetch_imaging=True"]),
        ("training: {momentum: 2}", ["training.momentum: 2", "expected a number in [0, 1]"]),
        ("plan: {patch_size_3d: [0, 128]}", ["plan.patch_size_3d: [0, 128]", "a list of 3"]),
        ("synthetic: {cases: 1, seed: 0}", ["synthetic.cases: 1", "an integer >= 2"]),
    ],
)
def test_a_wrong_value_is_named_with_what_is_expected(tmp_path, args, wanted):
    if isinstance(args, str):
        (tmp_path / "bad.yaml").write_text(args + "\n")
        args = ["--configfile", str(tmp_path / "bad.yaml")]
    proc = _snakemake(tmp_path, *args)
    out = _output(proc)
    assert proc.returncode != 0
    assert all(w in out for w in wanted), out[-3000:]
    assert len(out.splitlines()) <= MAX_LINES, out[-3000:]
    assert "Failed validating" not in out and "On instance" not in out, out[-3000:]


@pytest.mark.parametrize("how", ["preset", "--configfile", "--config"])
def test_a_missing_data_root_says_where_it_was_set_and_what_to_run(tmp_path, how):
    launch = tmp_path / "launch"
    if how == "preset":  # config/kits21.yaml's data_root: kits21/kits21/data, relative
        proc = _snakemake(launch, "--config", "preset=paper")
        root = launch / "kits21" / "kits21" / "data"
        wanted = [
            "from preset paper, config/kits21.yaml",
            f"relative to the folder snakemake was started in ({launch})",
            # the README's commands, to be run there
            f"in {launch}: git clone https://github.com/neheller/kits21 && "
            "kitsnet fetch kits21 --out kits21/kits21/data",
        ]
    elif how == "--configfile":
        root = tmp_path / "elsewhere" / "kits21" / "data"
        (launch / "my.yaml").parent.mkdir(parents=True)
        (launch / "my.yaml").write_text(f"preset: paper\ndata_root: {root}\n")
        proc = _snakemake(launch, "--configfile", "my.yaml")
        wanted = [
            "from --configfile my.yaml",
            f"git clone https://github.com/neheller/kits21 {tmp_path / 'elsewhere'} && "
            f"kitsnet fetch kits21 --out {root}",
        ]
    else:
        proc = _snakemake(launch, "--config", "preset=paper", "data_root=mine/data")
        root = launch / "mine" / "data"
        wanted = ["It is data_root: mine/data from --config,", "git clone"]
    out = _output(proc)
    assert proc.returncode != 0
    assert f"data_root: '{root}' is missing or not a folder" in out, out[-3000:]
    assert all(w in out for w in wanted), out[-3000:]
    assert len(out.splitlines()) <= MAX_LINES, out[-3000:]


def test_a_relative_data_root_is_read_from_the_launch_folder_with_directory(tmp_path):
    """The README's run on scratch storage, from the folder that holds kits21/ (the paper's
    relative data_root): the data is found there, every output and .snakemake/ go to scratch."""
    launch = tmp_path / "checkout"
    root = kits_tree(launch / "kits21" / "kits21" / "data", 6)
    before = sorted(launch.rglob("*"))
    scratch = tmp_path / "scratch"
    args = [
        "--profile",
        str(REPO / "slurm"),
        "--directory",
        str(scratch),
        "--",
        "results/table1.csv",
    ]
    # a stale $PWD (a launcher that changed folder without updating it) does not matter
    proc = _snakemake(launch, *args, env={"PWD": str(tmp_path)})
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert f"{root}/case_00000/imaging.nii.gz" in out
    assert sorted(launch.rglob("*")) == before
    assert (scratch / ".snakemake").is_dir()


def test_jobs_resolve_data_root_as_the_main_process_did(tmp_path):
    """A job that Snakemake spawns (on SLURM: in the working directory) reads the launch folder
    from KITSNET_LAUNCH_DIR, which the main process sets, instead of its own folder."""
    launch = tmp_path / "checkout"
    kits_tree(launch / "kits21" / "kits21" / "data", 6)
    work = tmp_path / "scratch"
    args = ["--mode", "subprocess", "--config", "preset=paper", "--", "results/table1.csv"]
    job = _snakemake(work, *args, env={"KITSNET_LAUNCH_DIR": str(launch)})
    assert job.returncode == 0, _output(job)[-3000:]
    alone = _snakemake(work, *args)
    assert alone.returncode != 0 and str(work / "kits21") in _output(alone)


def test_synthetic_data_stays_in_the_working_directory_with_directory(tmp_path):
    """The demo's data_root (results/data/demo) is the working directory's, not the launch
    folder's: nothing is ever generated outside the working directory's results/."""
    launch, scratch = tmp_path / "launch", tmp_path / "scratch"
    micro = str(REPO / "tests" / "data" / "micro.yaml")
    proc = _snakemake(launch, "--directory", str(scratch), "--configfile", micro)
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "results/data/demo/case_00000/imaging.nii.gz" in out
    assert f"{launch}/results" not in out
    assert not (launch / "results").exists()
