"""Shared fixtures: the repository root, the shared KiTS21 label maps, tiny KiTS-layout data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LABELS = REPO.parent / "shared" / "kits21_labels"
SHARED_PAPER = REPO.parent / "shared" / "paper"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_labels() -> Path:
    if not SHARED_LABELS.is_dir():
        pytest.skip(f"{SHARED_LABELS} is absent: the real KiTS21 label maps live in ../shared")
    return SHARED_LABELS


@pytest.fixture(scope="session")
def shared_paper() -> Path:
    if not SHARED_PAPER.is_dir():
        pytest.skip(f"{SHARED_PAPER} is absent: the paper's text lives in ../shared")
    return SHARED_PAPER


@pytest.fixture(scope="session")
def tiny_kits(tmp_path_factory) -> Path:
    """Ten synthetic cases in KiTS21's layout (session-wide, read-only for tests)."""
    from kitsnet.synth import make_dataset

    root = tmp_path_factory.mktemp("kits") / "data"
    make_dataset(root, 10, seed=7)
    return root


def cube_label(shape=(20, 24, 24), box=(slice(5, 15), slice(6, 18), slice(6, 18))) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[box] = 1
    return lab


def run_workflow(workdir: Path, *args: str, check: bool = True):
    """Run this repository's Snakefile from ``workdir`` (it finds its config files itself)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def checkout_state() -> list[str] | None:
    """Everything git sees in this checkout, ignored files included (bytecode caches aside);
    None outside a git checkout."""
    import subprocess

    proc = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    skip = ("__pycache__", ".pytest_cache", ".ruff_cache")
    return sorted(line for line in proc.stdout.splitlines() if not any(s in line for s in skip))


@pytest.fixture(scope="session")
def micro_demo_run(tmp_path_factory) -> dict:
    """The micro demo (tests/data/micro.yaml) run once from scratch, as users put outputs on
    scratch storage: from the checkout with ``--directory`` elsewhere.  The folder it wrote to,
    and the checkout's state before and after."""
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("micro_demo")
    before = checkout_state()
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--directory",
        str(workdir),
        "--cores",
        "2",
        "--configfile",
        str(REPO / "tests/data/micro.yaml"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return {"workdir": workdir, "before": before, "after": checkout_state()}


@pytest.fixture(scope="session")
def micro_demo(micro_demo_run) -> Path:
    """The folder of the micro demo's run.  Shared by the end-to-end and the determinism tests:
    treat it as read-only."""
    return micro_demo_run["workdir"]


@pytest.fixture
def one_torch_thread():
    """Small networks: extra intra-op threads only contend on a shared 2-core CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
