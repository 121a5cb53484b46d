"""``device: cuda`` without a usable GPU: the job stops within seconds, says why and what to do,
and leaves no model behind (a GPU job never trains on the CPU by accident)."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch
from conftest import REPO, run_workflow

from kitsnet.core.device import CudaUnavailable, cuda_diagnosis, pick_device

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
def test_pick_device_cuda_without_cuda_names_the_build_and_the_driver():
    with pytest.raises(CudaUnavailable) as err:
        pick_device("cuda")
    msg = str(err.value)
    assert f"torch {torch.__version__}" in msg
    assert "NVIDIA driver" in msg and "training.device" in msg
    assert "--index-url" in msg  # how to install another CUDA build of the same torch


def test_the_diagnosis_says_which_driver_a_cuda_build_needs(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    msg = cuda_diagnosis("cuda", "The NVIDIA driver on your system is too old")
    assert "CUDA 13.0" in msg and ">= 580" in msg and "too old" in msg


def test_auto_and_cpu_never_fail():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")


@needs_no_cuda
@pytest.mark.workflow
def test_a_gpu_training_job_without_cuda_fails_fast_and_writes_no_model(micro_demo, tmp_path):
    """The micro demo's preprocessed data, then one training job with ``device: cuda``."""
    results = tmp_path / "results"
    shutil.copytree(micro_demo / "results", results, ignore=shutil.ignore_patterns("models"))
    cuda = tmp_path / "cuda.yaml"
    cuda.write_text("training:\n  device: cuda\n")
    target = "results/models/3d_lowres/fold_0/model_final.pt"
    t0 = time.perf_counter()
    proc = run_workflow(
        tmp_path,
        "--cores",
        "1",
        "--configfile",
        str(REPO / "tests/data/micro.yaml"),
        str(cuda),
        "--",
        target,
        check=False,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode != 0
    assert seconds < 30, f"the failing job took {seconds:.0f} s"
    out = proc.stdout + proc.stderr
    # only the training job was scheduled: the data came from the copied results
    assert re.search(r"^train\s+1$", out, re.M) and re.search(r"^total\s+1$", out, re.M), out
    log = (results / "logs/train/3d_lowres_fold0.log").read_text()
    assert "no usable CUDA device" in log and "NVIDIA driver" in log
    assert f"torch {torch.__version__}" in log
    models = results / "models"
    assert not models.exists() or not list(models.rglob("*.pt"))
