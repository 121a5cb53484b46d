"""benchmarks/gpu.sh in its CPU smoke mode: every part of the GPU benchmark runs and reports.

The real run happens later on a GPU machine that nobody can debug interactively, so CI runs the
same code paths (data workers, kitsnet's and nnU-Net's training steps, both sliding windows,
FLOP counting, the table, the JSON) with tiny sizes on the CPU.  Without nnU-Net (no ``peer``
extra) its rows must say why they were skipped instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ("kitsnet train", "nnU-Net train", "kitsnet sliding window", "nnU-Net sliding window")
pytestmark = pytest.mark.bench


def test_gpu_benchmark_smoke_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--out-dir", str(tmp_path),
         "--tmp-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    # gpu.sh caps the smoke mode at 105 s (exit 124 beyond), inside CI's 2-minute allowance
    assert proc.returncode == 0, out[-6000:]

    header = next(line for line in proc.stdout.splitlines() if line.startswith("part "))
    for col in ("status", "it/s", "time", "GPU util", "TFLOP/s", "MFU"):
        assert col in header
    lines = {line[:24].strip(): line for line in proc.stdout.splitlines()}
    for row in ROWS:
        assert row in lines, f"no table row {row!r}:\n{proc.stdout}"

    files = list(tmp_path.glob("gpu-*.json"))
    assert len(files) == 1, files
    report = json.loads(files[0].read_text())
    assert report["mode"] == "smoke"
    res = report["results"]
    has_nnunet = importlib.util.find_spec("nnunetv2") is not None
    for side in ("kitsnet", "nnunet"):
        train, sw = res[f"{side}_train"], res[f"{side}_sw"]
        if side == "nnunet" and not has_nnunet:
            for r in (train, sw):
                assert r["status"] == "skipped" and "nnunetv2" in r["reason"], r
            assert "skipped" in lines["nnU-Net train"]
            continue
        assert train["status"] == "ok", train
        assert train["iters_per_s"] > 0 and train["iterations"] >= 2
        assert train["loss_finite"]
        assert train["forward_flops"] > 0 and train["achieved_tflops"] > 0
        assert sw["status"] == "ok", sw
        assert sw["sw_seconds"] > 0 and sw["finite"]
        assert sw["tiles"] >= 2 and sw["mirrors"] == 8
    if has_nnunet:  # the same network on both sides: the same FLOPs
        assert res["kitsnet_train"]["forward_flops"] == res["nnunet_train"]["forward_flops"]
    # the synthetic cases were cleaned up; only the JSON stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [files[0].name]
