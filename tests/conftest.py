"""Shared fixtures: the repository root, real KiTS21 label maps ($KITSNET_KITS21_LABELS), tiny
KiTS-layout data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def no_slurm_controller_wait(tmp_path_factory):
    """Snakemake's SLURM executor plugin runs ``scontrol show config`` every time snakemake
    starts (to word a help text).  Where SLURM's commands are installed but no controller runs
    (CI outside the SLURM tests, a workstation with slurm-client), that waits 10 s per snakemake
    call: five minutes over the quick tests' dry runs.  A SLURM_CONF naming a controller on a
    closed port with 1 s timeouts makes it fail at once; tests/workflow/test_slurm.py drops it for
    its own
    cluster.  A SLURM_CONF the user set is left alone."""
    import os
    import shutil

    if not shutil.which("scontrol") or "SLURM_CONF" in os.environ:
        yield None
        return
    conf = tmp_path_factory.mktemp("slurm") / "unreachable.conf"
    conf.write_text(
        "ClusterName=none\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=1\n"
    )
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def kits21_label_maps() -> dict[str, dict[str, Path]]:
    """``case -> {"MAJ": path, "AND": path, "OR": path}`` of the real KiTS21 label maps that
    $KITSNET_KITS21_LABELS points at (CI: the 12 cases it carries); skips saying how to set it."""
    from kitsnet.data.dataset import label_maps_from_env

    maps, why = label_maps_from_env()
    if not maps:
        pytest.skip(why)
    return maps


@pytest.fixture(scope="session")
def tiny_kits(tmp_path_factory) -> Path:
    """Ten synthetic cases in KiTS21's layout (session-wide, read-only for tests)."""
    from kitsnet.data.synth import make_dataset

    root = tmp_path_factory.mktemp("kits") / "data"
    make_dataset(root, 10, seed=7)
    return root


def cube_label(shape=(20, 24, 24), box=(slice(5, 15), slice(6, 18), slice(6, 18))) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[box] = 1
    return lab


def run_workflow(
    workdir: Path,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    timeout: float | None = None,
):
    """Run this repository's Snakefile from ``workdir`` (it finds its config files itself), as
    from a shell there ($PWD is ``workdir``; ``env`` on top of this process's environment)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    env = {**os.environ, "PWD": str(workdir), **(env or {})}
    proc = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def kits_tree(root: Path, n: int, missing: str | None = None) -> Path:
    """``n`` tiny cases in KiTS21's layout, all a dry run reads (names and headers);
    ``missing``: one file left out (a broken download)."""
    import nibabel as nib

    from kitsnet.data.synth import kits_affine

    aff = kits_affine((3.0, 0.8, 0.8))
    for i in range(n):
        case = root / f"case_{i:05d}"
        case.mkdir(parents=True)
        img = np.full((4, 8, 8), -1000, np.int16)
        nib.save(nib.Nifti1Image(img, aff), case / "imaging.nii.gz")
        seg = np.zeros((4, 8, 8), np.uint8)
        nib.save(nib.Nifti1Image(seg, aff), case / "aggregated_MAJ_seg.nii.gz")
    if missing:
        (root / missing).unlink()
    return root


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


def smooth_noise(shape, rng, every: int = 6):
    """float32 noise of unit spread that varies smoothly over ``every`` voxels: what the
    logits of a trained network look like away from its decisions (the fixtures of the
    probability, export and ensemble tests)."""
    import numpy as np
    from scipy import ndimage

    small = ndimage.gaussian_filter(rng.standard_normal([max(2, s // every) for s in shape]), 1.0)
    small /= small.std()
    zoom = [s / m for s, m in zip(shape, small.shape, strict=True)]
    return ndimage.zoom(small, zoom, order=1).astype(np.float32)
