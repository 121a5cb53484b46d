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
    """Run this repository's Snakefile from ``workdir`` (given a copy of config/)."""
    import shutil
    import subprocess
    import sys

    if not (workdir / "config").exists():
        shutil.copytree(REPO / "config", workdir / "config")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_demo(tmp_path_factory) -> Path:
    """The micro demo (tests/data/micro.yaml) run once from scratch; the folder it ran in.
    Shared by the end-to-end and the determinism tests: treat it as read-only."""
    workdir = tmp_path_factory.mktemp("micro_demo")
    run_workflow(workdir, "--cores", "2", "--configfile", str(REPO / "tests/data/micro.yaml"))
    return workdir


@pytest.fixture
def one_torch_thread():
    """Small networks: extra intra-op threads only contend on a shared 2-core CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
