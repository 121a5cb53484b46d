"""One machine with one GPU: the workstation profile runs the paper's settings with one GPU job
at a time and the jobs' memory requests fitted to the machine; the GPU memory the README
estimates for each configuration is counted here from the networks themselves."""

from __future__ import annotations

import os
import re
import subprocess
import weakref
from pathlib import Path

import pytest
import yaml
from conftest import REPO, kits_tree, run_workflow

PROFILE = REPO / "profiles" / "workstation"
GiB = 2**30


def _dry_run(launch: Path, *args: str) -> subprocess.CompletedProcess:
    return run_workflow(launch, "-n", *args, check=False, timeout=300)


def _jobs(stdout: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run lists."""
    jobs = []
    for block in re.split(r"\n(?:local)?rule ", stdout)[1:]:
        found = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        pairs = found.group(1).split(", ") if found else []
        jobs.append((block.split(":")[0], dict(p.split("=", 1) for p in pairs)))
    return jobs


def test_the_profile_caps_gpu_jobs_at_one_and_sets_the_papers_preset():
    text = (PROFILE / "config.yaml").read_text()
    profile = yaml.safe_load(text)
    assert "gpu=1" in profile["resources"]
    assert profile["config"] == ["preset=paper"]  # as the SLURM profile
    assert profile["cores"] == "all" and profile["rerun-incomplete"] and profile["keep-going"]


def test_a_paper_run_on_a_workstation_plans_one_gpu_per_job_within_the_machine(tmp_path):
    """The README's command with a my.yaml of only data_root: the paper's 30 trainings, each
    asking for the one GPU (so Snakemake runs them one after another), and no job asking for
    more host memory than the machine has (the paper's requests are sized for SLURM nodes)."""
    root = kits_tree(tmp_path / "data", 6)
    (tmp_path / "my.yaml").write_text(f"data_root: {root}\n")
    args = ["--profile", str(PROFILE), "--configfile", "my.yaml", "--", "results/table1.csv"]
    proc = _dry_run(tmp_path, *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = _jobs(proc.stdout)
    gpu_jobs = [(rule, res) for rule, res in jobs if int(res.get("gpu", 0))]
    assert sum(rule == "train" for rule, _ in gpu_jobs) == 30
    assert {rule for rule, _ in gpu_jobs} == {"train", "predict", "predict_lowres"}
    assert all(res["gpu"] == "1" for _, res in gpu_jobs)
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    assert max(int(res.get("mem_mb", 0)) for _, res in jobs) <= ram_mb
    assert "synth" not in {rule for rule, _ in jobs}


def test_a_job_wanting_more_gpus_than_the_run_has_stops_before_any_job(tmp_path):
    proc = _dry_run(tmp_path, "--profile", str(PROFILE), "--resources", "gpu=0")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "resources.train.gpu: 1 GPU(s) per job, but this run has gpu=0" in out, out[-3000:]


# ------------------------------------------------------------------ GPU memory, estimated
def _live_peak(run) -> int:
    """Peak bytes of live tensors while ``run()`` executes on the meta device (shapes only,
    nothing computed): every tensor an op returns is tracked until Python drops it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[weakref.ref] = []
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if torch.is_tensor(t)]
            alive = [t for t in (r() for r in self.refs) if t is not None]
            self.refs = [weakref.ref(t) for t in alive]
            storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in alive}
            self.peak = max(self.peak, sum(storages.values()))
            return out

    mode = Live()
    with mode:
        run()
    return mode.peak


def _paper_network(name: str):
    """The paper's network of ``name`` (config/kits21.yaml: 30 base features, 320 / 480 at most,
    nnU-Net's topology for its patch), in bfloat16 on the meta device, and its patch and batch."""
    import torch

    from kitsnet.model.network import build_network
    from kitsnet.plan.planner import features_per_stage
    from kitsnet.plan.topology import pool_and_conv_props

    cfg = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())["plan"]
    dim = 2 if name == "2d" else 3
    spacing = cfg["lowres_spacing"] if name == "3d_lowres" else cfg["fullres_spacing"]
    patch = cfg["patch_size_2d"] if dim == 2 else cfg["patch_size_3d"]
    topo = pool_and_conv_props(spacing[:dim], patch)
    cap = cfg["max_features_2d"] if dim == 2 else cfg["max_features_3d"]
    arch = {
        "dim": dim,
        "features_per_stage": features_per_stage(cfg["base_features"], cap, topo.n_stages),
        "strides": topo.strides,
        "kernel_sizes": topo.kernel_sizes,
    }
    channels = 4 if name.startswith("3d_cascade") else 1  # image + previous stage's labels 1-3
    with torch.device("meta"):
        net = build_network(arch, channels, 4).to(torch.bfloat16)
    batch = cfg["batch_size_2d"] if dim == 2 else cfg["batch_size_3d"]
    return net, topo.patch_size, batch, channels


@pytest.mark.parametrize(
    "name, train_gib, infer_gib",
    # the README's figures (On a single-GPU workstation), before context, workspace and slack
    [("2d", 4.2, 0.44), ("3d_fullres", 4.1, 6.2), ("3d_cascade_fullres", 4.1, 6.2)],
)
def test_the_readmes_gpu_memory_figures(name, train_gib, infer_gib):
    """Peak activation memory of one training step (forward, loss, backward) at the paper's
    patch and batch, and of one sliding-window forward (a tile under every mirroring), in
    bfloat16 as under autocast.  Counted, not measured on a GPU: no cuDNN workspace, CUDA
    context or allocator slack, which the README adds."""
    import torch

    net, patch, batch, channels = _paper_network(name)
    x = torch.empty(batch, channels, *patch, dtype=torch.bfloat16, device="meta")

    def step() -> None:
        outs = net(x)
        sum(torch.softmax(o.float(), 1).sum() for o in outs).backward()

    mirrored = torch.empty(2 ** len(patch), channels, *patch, dtype=torch.bfloat16, device="meta")

    def infer() -> None:
        net.deep_supervision = False  # as kitsnet.predict.infer.load_models
        with torch.no_grad():
            net.eval()(mirrored).float()

    assert _live_peak(step) / GiB == pytest.approx(train_gib, abs=0.1)
    assert _live_peak(infer) / GiB == pytest.approx(infer_gib, abs=0.1)
