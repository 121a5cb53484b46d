"""``python -m benchmarks --quick``: the side-by-side harness runs and writes the JSON it promises.

Quick sizes only (the figures to quote come from a full run, see README "Benchmarks"); what is
pinned here is the protocol: every benchmark ran in its own processes, the JSON has the fields
the README documents, peak memory covers at least the inputs, and where nnU-Net is installed
(the ``peer`` extra, as in CI) both sides ran and their outputs agree.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench

QUICK = ["preprocess", "export", "sliding_window", "augment", "evaluate", "memory", "cascade_roi"]
QUICK += ["ensemble_storage"]
FIELDS = {"name", "kitsnet_s", "peer_s", "ratio", "runs", "kitsnet_peak_mb", "peer_peak_mb"}
HAS_PEER = importlib.util.find_spec("nnunetv2") is not None


@pytest.fixture(scope="module")
def quick_run(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", ",".join(QUICK)]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = out.glob("*-quick.json")
    return json.loads(result.read_text()), proc.stdout


def test_quick_run_writes_every_benchmark_with_the_documented_fields(quick_run):
    result, stdout = quick_run
    assert {"cpus", "torch", "nnunetv2", "cpu"} <= set(result["machine"])
    entries = {e["name"]: e for e in result["benchmarks"]}
    assert list(entries) == QUICK
    for name, e in entries.items():
        assert FIELDS <= set(e), name
        if e.get("skipped"):
            continue
        assert e["runs"] == 1 and e["kitsnet_s"] > 0
        assert e["kitsnet_peak_mb"] >= e["kitsnet_inputs_mb"] > 0
        assert name in stdout
    assert "ratio" in stdout and "written" in stdout


@pytest.mark.skipif(not HAS_PEER, reason="nnU-Net v2 is only installed with the 'peer' extra")
def test_quick_run_measures_nnunet_and_agrees_with_it(quick_run):
    entries = {e["name"]: e for e in quick_run[0]["benchmarks"]}
    for name in ("preprocess", "export", "sliding_window", "augment"):
        e = entries[name]
        assert e["peer_s"] > 0 and e["peer_peak_mb"] > 0
        assert e["ratio"] == pytest.approx(e["peer_s"] / e["kitsnet_s"])
    pre = entries["preprocess"]["check"]
    assert pre["shapes_equal"]
    assert max(pre["max_abs_diff_fullres"], pre["max_abs_diff_lowres"]) <= pre["tolerance"]
    exp = entries["export"]["check"]
    assert exp["shape_equal"] and exp["label_agreement"] > 0.9999
    # nnU-Net accumulates tiles in float16 (tests/nnunet/test_infer_nnunet.py): labels, not logits
    assert entries["sliding_window"]["check"]["argmax_agreement"] > 0.99
    assert entries["augment"]["kitsnet_patches_per_s_per_core"] > 0


def test_memory_benchmark_has_no_peer_and_reports_against_its_limit(quick_run):
    e = {e["name"]: e for e in quick_run[0]["benchmarks"]}["memory"]
    assert e["peer_s"] is None and e["ratio"] is None
    assert e["limit_mb"] == 16 * 1024


def test_cascade_roi_reports_the_time_and_storage_ratios_of_the_crop(quick_run):
    """The fullres stage on the first stage's box vs the whole volume, through predict_fold on
    both sides: the time ratio in the table, the storage ratio printed and in the JSON."""
    result, stdout = quick_run
    e = {e["name"]: e for e in result["benchmarks"]}["cascade_roi"]
    if e.get("skipped"):
        pytest.skip(e["skipped"])
    assert e["peer_s"] > 0 and e["ratio"] == pytest.approx(e["peer_s"] / e["kitsnet_s"])
    assert e["ratio"] > 1  # fewer tiles, even on the quick grid
    assert e["voxel_ratio"] > 1 and e["storage_ratio"] > 1
    assert e["storage_ratio_with_previous_stage"] > e["storage_ratio"]
    assert "cascade_roi:" in stdout and "storage" in stdout


@pytest.mark.skipif(not HAS_PEER, reason="nnU-Net v2 is only installed with the 'peer' extra")
def test_ensemble_storage_reports_bytes_against_nnunet_and_the_ensembles_agreement(quick_run):
    """Compact probabilities vs nnU-Net's --save_probabilities .npz on a real-geometry case (the
    issue's goal: >= 10x smaller) and a two-member ensemble's arg-max vs nnU-Net's."""
    result, stdout = quick_run
    e = {e["name"]: e for e in result["benchmarks"]}["ensemble_storage"]
    if e.get("skipped"):
        pytest.skip(e["skipped"])
    assert e["kitsnet_bytes"] > 0 and e["nnunet_bytes"] > 0
    assert e["storage_ratio"] == pytest.approx(e["nnunet_bytes"] / e["kitsnet_bytes"])
    assert e["storage_goal_met"] is True
    assert e["check"]["ensemble_argmax_agreement"] >= 0.9999
    assert "ensemble_storage:" in stdout and "smaller" in stdout
