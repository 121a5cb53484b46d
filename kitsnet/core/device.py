"""Which device a training or prediction job runs on, and the precision it runs in.

``device: cuda`` (the paper's config) means "a GPU or nothing": a GPU job that finds no usable
CUDA device stops within seconds with an error naming torch's CUDA build, the NVIDIA driver and
what to do, instead of training on the CPU for its whole allocation.  ``device: auto`` (the
demo) takes a GPU when one works and the CPU otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from kitsnet.core.io import KitsnetError

# Oldest Linux driver branch each CUDA major version's runtime runs on (NVIDIA's CUDA
# compatibility tables: minor-version compatibility within a major version).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
TORCH_INDEX = "https://download.pytorch.org/whl"


class CudaUnavailable(KitsnetError):
    """``device: cuda`` was asked for and torch cannot use a CUDA GPU here."""


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, or None when no NVIDIA driver is loaded."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9]+(?:\.[0-9]+)+)", proc.read_text())
        if m:
            return m.group(1)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            lines = out.stdout.strip().splitlines()
            if out.returncode == 0 and lines:
                return lines[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def cuda_diagnosis(name: str, reason: str) -> str:
    """Why ``name`` cannot be used and what to do: torch's CUDA build, the driver, the GPUs
    this job was given."""
    build = torch.version.cuda
    version = torch.__version__.split("+")[0]
    driver = driver_version()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines = [
        f"device '{name}' was asked for (training.device) but no usable CUDA device: {reason}",
        f"  torch {torch.__version__}: "
        + (f"built for CUDA {build}" if build else "a CPU-only build (no CUDA at all)"),
        "  NVIDIA driver: "
        + (driver or "none found (no /proc/driver/nvidia/version, no nvidia-smi)"),
        "  CUDA_VISIBLE_DEVICES: " + ("unset" if visible is None else repr(visible)),
        "What to do:",
    ]
    if driver is None:
        lines.append(
            "  - run on a GPU node: does the job ask for a GPU (the rule's gpu resource, the "
            "profile's GPU partition)?"
        )
    if build:
        major = int(build.split(".")[0])
        need = MIN_DRIVER.get(major)
        if need:
            lines.append(f"  - torch's CUDA {build} build needs an NVIDIA driver >= {need}")
    lines.append(
        f"  - for an older driver install a CUDA 12 build of the same torch: pip install "
        f"'torch=={version}' --index-url {TORCH_INDEX}/cu126 (README: GPU drivers)"
    )
    lines.append("  - to train on the CPU on purpose, set training.device: cpu (or auto)")
    return "\n".join(lines)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: a GPU when torch can use one, else the CPU.  ``cuda``/``cuda:N``: that GPU,
    checked now by allocating on it, else :class:`CudaUnavailable`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise CudaUnavailable(cuda_diagnosis(name, "torch.cuda.is_available() is False"))
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise CudaUnavailable(cuda_diagnosis(name, f"only {count} GPU(s) visible"))
    try:
        torch.zeros(1, device=dev)
    except RuntimeError as exc:  # e.g. "The NVIDIA driver on your system is too old"
        raise CudaUnavailable(cuda_diagnosis(name, str(exc).splitlines()[0])) from exc
    return dev


def amp_dtype(dev: torch.device) -> torch.dtype | None:
    """Autocast precision on ``dev``, for training and inference alike: bf16 on GPUs that have
    it, else fp16 (training adds loss scaling); None (float32) on the CPU."""
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_backends(dev: torch.device) -> None:
    """cuDNN autotuning on a GPU (fixed patch sizes: the fastest kernels are found once), as
    nnU-Net's training entry point sets it."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
