"""What the CPU benchmarks share besides their inputs (``benchmarks.inputs``): the paper's
grids and plans, and the cache of written cases."""

from __future__ import annotations

import copy
import importlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FULLRES = [0.78125, 0.78125, 0.78125]  # the paper's grids (config/kits21.yaml)
LOWRES = [1.99, 1.99, 1.99]
NORMALIZATION = {"clip": [-79.0, 304.0], "mean": 101.0, "std": 76.9}  # KiTS21-like HU figures


def peer_available(*modules: str) -> str | None:
    """None when nnU-Net v2 (and its ``modules``) can be imported, else why not."""
    try:
        for name in ("nnunetv2", *modules):
            importlib.import_module(name)
    except ImportError as exc:
        return f"nnunetv2 is not importable (pip install -e '.[peer]'): {exc}"
    return None


def trainer_available() -> str | None:
    """None when nnU-Net's trainer (its data loader, transforms and augmenters) imports."""
    return peer_available("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")


def kitsnet_plan(configuration: str, spacing: list[float]) -> dict[str, Any]:
    """The parts of a kitsnet plan that preprocessing and export read (and nnU-Net's plans
    translation needs), with KiTS21-like CT statistics."""
    plan = {"configuration": configuration, "spacing": spacing, "patch_size": [128, 128, 128]}
    return {**plan, "normalization": NORMALIZATION, "anisotropy_threshold": 3.0}


def paper_config() -> dict[str, Any]:
    """config/kits21.yaml: the paper's settings."""
    import yaml

    return yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())


def paper_plans(names: tuple[str, ...], **plan_settings: Any) -> dict[str, dict]:
    """``make_plan`` of config/kits21.yaml (its ``plan`` section updated by ``plan_settings``)
    on the fingerprint of the real KiTS21 label maps, per configuration in ``names``."""
    from benchmarks.inputs import real_geometry_fingerprint
    from kitsnet.plan.planner import make_plan

    cfg = paper_config()
    cfg["plan"].update(plan_settings)
    fp = real_geometry_fingerprint()
    return {name: make_plan(name, fp, copy.deepcopy(cfg)) for name in names}


def cached(name: str, key: str, write: Callable[[Path], None]) -> Path:
    """A folder of inputs in the temporary directory, written by ``write`` on first use and
    renamed into place whole, so every child process of a run (and later runs) reuses it."""
    root = Path(tempfile.gettempdir()) / f"kitsnet-bench-{name}-{key}"
    if (root / "done").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        write(tmp)
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
