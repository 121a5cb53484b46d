"""The workflow deployed as a Snakemake module from a Git tag, as snakedeploy deploys it.

A deployment has no checkout of the workflow: its Snakefile only declares the module (the
workflow's Snakefile read from a tagged release), and kitsnet comes from the installed package.
Here the "release" is a Git repository made from this working tree and tagged with the
version of pyproject.toml; Snakemake reads every workflow file from the tag through its source
cache (``gitfile``), which is how ``github(..., tag=...)`` works for a published repository.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# snakedeploy's template (use_module.smk.jinja), with the source of a local tag
DEPLOYED_SNAKEFILE = """\
from snakemake.utils import min_version

min_version("6.10.0")


configfile: "config/config.yaml"


module kitsnet:
    snakefile:
        gitfile("{repo}", path="Snakefile", tag="{tag}")
    config:
        config


use rule * from kitsnet
"""


def _git(cwd: Path, *args: str) -> str:
    env_args = ["-c", "user.name=test", "-c", "user.email=test@example.org"]
    proc = subprocess.run(["git", *env_args, *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# Snakemake 9.27's LocalGitFile.join (the gitfile() source; github() is HostingProviderFile) has
# two bugs github() does not: a Snakefile at the repository's root joins its includes to
# "/rules/..." (github() strips the slash), and a rule's script arrives as a LocalSourceFile,
# not a str (TypeError).  The runner fixes that one method so that a local tag can stand in for
# github(..., tag=...); everything else is Snakemake's own code.
RUNNER = """
import posixpath, sys
from snakemake import sourcecache as sc

def join(self, path):
    if isinstance(path, sc.SourceFile):
        path = path.get_path_or_uri(secret_free=False)
    joined = posixpath.normpath(posixpath.join(self.path, path))
    return sc.LocalGitFile(self.repo_path, joined, tag=self.tag, ref=self._ref, commit=self.commit)

sc.LocalGitFile.join = join
from snakemake.cli import main
sys.argv[0] = "snakemake"
main()
"""


def tagged_release(repo: Path, version: str) -> Path:
    """A Git repository holding this working tree's files (tracked and new, not ignored) in
    committed and tagged v<version>, with pyproject.toml saying <version>."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a Git checkout of the workflow")
    dest = repo
    files = _git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    pyproject = dest / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(f'version = "{VERSION}"', f'version = "{version}"')
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"release {version}")
    _git(repo, "tag", f"v{version}")
    return repo


def deploy(tmp_path: Path, release: Path, tag: str, source: str | None = None) -> Path:
    """What `snakedeploy deploy-workflow URL DEST --tag TAG` writes: the release's config/ as the
    user's template (here with the micro settings), and a Snakefile declaring the module
    (``source``: the module's snakefile declaration, by default gitfile() of the tag)."""
    dest = tmp_path / "deployment"
    shutil.copytree(release / "config", dest / "config")
    shutil.copy(REPO / "tests/data/micro.yaml", dest / "config/config.yaml")
    (dest / "workflow").mkdir()
    snakefile = DEPLOYED_SNAKEFILE.format(repo=release, tag=tag)
    if source is not None:
        snakefile = snakefile.replace(
            f'gitfile("{release}", path="Snakefile", tag="{tag}")', source
        )
    (dest / "workflow/Snakefile").write_text(snakefile)
    return dest


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUNNER, "-s", "workflow/Snakefile", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)


@pytest.mark.workflow
def test_module_deployment_from_a_git_tag_runs_jobs_with_the_installed_kitsnet(tmp_path):
    release = tagged_release(tmp_path / "release", VERSION)
    dest = deploy(tmp_path, release, f"v{VERSION}")
    plan = snakemake(dest, "-n", "--", "results/table1.csv")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert "train" in plan.stdout and "3d_cascade_fullres" in plan.stdout
    # real jobs: the data stage, planning and preprocessing, every script read from the tag
    targets = [
        "results/dataset/splits.json",
        "results/plans/3d_fullres.json",
        "results/preprocessed/3d_fullres/case_00000_image.npy",
    ]
    proc = snakemake(dest, "--cores", "2", "--", *targets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all((dest / t).is_file() for t in targets)
    # the deployment holds only the user's files and the outputs; nothing was written into
    # the release (a source cache reads it at the tag)
    assert sorted(p.name for p in dest.iterdir()) == [".snakemake", "config", "results", "workflow"]
    assert _git(release, "status", "--porcelain", "--ignored") == ""
    log = (dest / "results/logs/plan/3d_fullres.log").read_text()
    assert log.strip(), "the plan job wrote no log"


def test_module_deployment_of_another_release_stops_naming_both_versions(tmp_path):
    """A deployment of tag v9.9.9 with kitsnet VERSION installed stops before any job: the
    plans and arrays of one release must not be made by another's code."""
    release = tagged_release(tmp_path / "release", "9.9.9")
    dest = deploy(tmp_path, release, "v9.9.9")
    proc = snakemake(dest, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "9.9.9" in out and f"installed kitsnet is {VERSION}" in out
    assert "pip install" in out
    assert not (dest / "results").exists()


def test_module_deployment_from_an_export_of_a_tag_plans_the_whole_grid(tmp_path):
    """The README's fallback while no tag is published: `git archive` of a tag, the module's
    snakefile a plain path into it; kitsnet still comes from the installed package."""
    release = tagged_release(tmp_path / "release", VERSION)
    export = tmp_path / "export"
    export.mkdir()
    archive = subprocess.run(
        ["git", "archive", f"v{VERSION}"], cwd=release, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
    shutil.rmtree(export / "kitsnet")  # the package must come from the installed kitsnet
    dest = deploy(tmp_path, release, f"v{VERSION}", source=f'"{export}/Snakefile"')
    proc = snakemake(dest, "-n", "--", "results/table1.csv")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    # the deployment's own config (the micro settings) names the configurations
    assert int(counts["train"]) == 5 * len(
        yaml.safe_load((dest / "config/config.yaml").read_text())["configurations"]
    )
