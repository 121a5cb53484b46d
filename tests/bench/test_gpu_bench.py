"""benchmarks/gpu.sh: the GPU rows of the benchmark harness (``gpu_train``, ``gpu_window``).

The real run happens later on a GPU machine that nobody can debug interactively, so CI runs the
same code paths with ``--quick`` (tiny sizes, on the CPU without CUDA): kitsnet's ``train_fold``
and sliding window, nnU-Net's training step and sliding window, the harness's children, table
and JSON.  Without nnU-Net (no ``peer`` extra) its side must say why it is missing; without CUDA
and ``--quick`` the rows must be skipped, saying so, in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ROWS = ("gpu_train", "gpu_window")
pytestmark = pytest.mark.bench


def gpu_sh(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run gpu.sh with its results (and the cached cases) under ``out``; its output and JSON."""
    (out / "tmp").mkdir(parents=True)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(out / "tmp")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--out", str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (result,) = out.glob("*.json")
    return proc, {e["name"]: e for e in json.loads(result.read_text())["benchmarks"]}


def figures(entry: dict) -> list[dict]:
    return entry["kitsnet_figures"] + entry.get("peer_figures", [])


def test_quick_mode_runs_every_row_through_the_harness(tmp_path: Path) -> None:
    # gpu.sh caps the quick mode at 150 s (exit 124 beyond)
    proc, entries = gpu_sh(tmp_path, "--quick")
    assert list(entries) == list(ROWS)
    has_nnunet = importlib.util.find_spec("nnunetv2") is not None
    for name in ROWS:
        e = entries[name]
        assert not e.get("skipped") and not e.get("failed"), e
        (k,) = e["kitsnet_figures"]
        assert e["kitsnet_s"] == k["seconds"] > 0  # the row's own timed window, not the call
        assert k["parameters"] > 0 and k["settings"]
        assert k["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        assert f"{name} kitsnet: " in proc.stdout
        if not has_nnunet:
            assert e["peer_s"] is None and "nnunetv2" in e["peer_missing"], e
            continue
        (p,) = e["peer_figures"]
        assert e["peer_s"] == p["seconds"] > 0 and e["ratio"] > 0
        assert p["parameters"] == k["parameters"]  # the same network on both sides
        assert f"{name} peer: " in proc.stdout
    for f in figures(entries["gpu_train"]):
        assert f["iterations"] >= 2 and f["loss_finite"]
    for f in figures(entries["gpu_window"]):
        assert f["finite"] and f["tiles"] >= 2 and f["mirrors"] == 8
    for name in ROWS:  # a table row with kitsnet's seconds
        assert re.search(rf"^{name} +\d+\.\d+ ", proc.stdout, re.MULTILINE), proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the rows would run")
def test_without_cuda_the_rows_are_skipped_saying_why(tmp_path: Path) -> None:
    proc, entries = gpu_sh(tmp_path)
    for name in ROWS:
        assert entries[name]["runs"] == 0 and "CUDA" in entries[name]["skipped"]
        assert f"{name}: skipped: CUDA is not available" in proc.stdout
    assert not list((tmp_path / "tmp").iterdir())  # no child wrote cases
