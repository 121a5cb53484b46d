"""Benchmark ``cascade_roi``: the fullres stage on the first stage's region of interest
(``3d_cascade_roi``) vs on the whole volume (``3d_cascade_fullres``), time and storage.

A painted real case (``benchmarks.inputs.real_case``, case_00057) on the paper's fullres grid;
its own labels stand in for a perfect first stage, so ``crop_case`` cuts the kidneys and masses
plus 20 mm.  Both sides run ``predict_fold`` on the CPU with one network (the paper's topology
at width 4-32, random weights), no mirroring: kitsnet the ``3d_cascade_roi`` plan on the crop,
the peer the ``3d_cascade_fullres`` plan on the whole case.  ``ratio`` = uncropped s / cropped
s (goal 5); ``extra``: bytes kept per case, ``storage_ratio`` (goal 4).  Quick: 2 mm, 32^3.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cached, paper_plans
from benchmarks.inputs import missing_label_maps, preprocessed_files, real_case

NAME = "cascade_roi"
GOAL = 5.0
STORAGE_GOAL = 4.0
MAX_RUNS = 1  # about 5 minutes on 2 cores (the uncropped side: 256 tiles of 128^3)
PEER = "the same network on the whole volume (3d_cascade_fullres's path)"
VERSION = "v1"

WIDTH = {"base_features": 4, "max_features_3d": 32}
FULL = {"case": "case_00057", "spacing": None, "patch": None}  # the paper's 0.78 mm, 128^3
QUICK = {"case": "case_00287", "spacing": [2.0, 2.0, 2.0], "patch": [32, 32, 32]}
INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": False, "tile_batch": 1}

WHAT = (
    f"predict_fold of real-geometry {FULL['case']} at 0.78 mm, the paper's 6-stage 128^3 "
    f"network at width {WIDTH['base_features']}-{WIDTH['max_features_3d']} (the same for both), "
    "no mirroring: cropped to the first stage's box + 20 mm vs the whole volume"
)


def skip_reason() -> str | None:
    return missing_label_maps([FULL["case"], QUICK["case"]])


def peer_available() -> str | None:
    return None  # the peer is kitsnet's own uncropped path


def _write(root: Path, sizes: dict[str, Any]) -> None:
    """The case preprocessed (``full/``), its first stage (``prev/``), the crop (``roi/``) and
    one network saved under both plans (``models/``)."""
    import torch

    from kitsnet.model.checkpoint import save_torch
    from kitsnet.model.network import build_network
    from kitsnet.preprocess.case import preprocess_case
    from kitsnet.preprocess.roi import crop_case

    grid = {"fullres_spacing": sizes["spacing"], "patch_size_3d": sizes["patch"]}
    settings = {**WIDTH, **(grid if sizes["spacing"] else {})}
    plans = paper_plans(("3d_cascade_roi", "3d_cascade_fullres"), **settings)
    case, plan = sizes["case"], plans["3d_cascade_roi"]
    for sub in ("src", "full", "prev", "roi", "models"):
        (root / sub).mkdir()
    image, label = real_case(case, root / "src")
    files = preprocessed_files(root / "full", case)
    preprocess_case(image, label, case, plan, *files)
    shutil.rmtree(root / "src")
    prev = root / "prev" / f"{case}.npy"
    shutil.copyfile(files[1], prev)  # a perfect first stage
    crop_case(case, *files, prev, plan, root / "roi" / case, log=lambda *_: None)
    torch.manual_seed(0)
    net = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
    for name, p in plans.items():
        state = {"state_dict": net.state_dict(), "plan": json.dumps(p)}
        save_torch(state, root / "models" / f"{name}.pt")


def setup(quick: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    key = f"{VERSION}-{sizes['case']}-{'quick' if sizes['spacing'] else 'paper'}"
    return {"root": cached(NAME, key, lambda tmp: _write(tmp, sizes)), "case": sizes["case"]}


def _predict(inputs: dict[str, Any], model: str, data: str, prev: bool) -> Path:
    """``predict_fold`` of ``model`` on the arrays in ``data`` (overwritten by every run)."""
    from kitsnet.predict.infer import predict_fold

    root, quiet = inputs["root"], {"device": "cpu", "log": lambda *_: None}
    out, prev_dirs = root / "pred" / model, [root / "prev"] if prev else None
    weights, cases = root / "models" / f"{model}.pt", [inputs["case"]]
    predict_fold(weights, cases, root / data, out, INFERENCE, prev_dirs=prev_dirs, **quiet)
    return out


# cropped: the 3d_cascade_roi plan on the crop, pasted back; uncropped: the whole fullres case
run_kitsnet = partial(_predict, model="3d_cascade_roi", data="roi", prev=False)
run_peer = partial(_predict, model="3d_cascade_fullres", data="full", prev=True)


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    """Storage per case of each side's fullres stage, and the box (printed, since the table
    has one ratio column: the time's)."""
    inputs = setup(quick)
    root, case = inputs["root"], inputs["case"]
    full = _bytes((root / "full").glob(f"{case}*"))
    prev = _bytes([root / "prev" / f"{case}.npy"])
    cropped = _bytes((root / "roi" / case).iterdir())
    manifest = json.loads((root / "roi" / case / "roi.json").read_text())
    box = manifest["boxes"][0]
    shape = [b - a for a, b in zip(box["start"], box["stop"], strict=True)]
    out = {
        "case": case,
        "fullres_shape": manifest["shape"],
        "box_shape": shape,
        "voxel_ratio": float(np.prod(manifest["shape"]) / np.prod(shape)),
        "uncropped_bytes": full,
        "uncropped_previous_stage_bytes": prev,
        "cropped_bytes": cropped,
        "storage_ratio": full / cropped,
        "storage_ratio_with_previous_stage": (full + prev) / cropped,
        "storage_goal_ratio": STORAGE_GOAL,
        "storage_goal_met": full / cropped >= STORAGE_GOAL,
        "inference": INFERENCE,
        "ratio_means": "uncropped s / cropped s, same network (reduced width) and 128^3 patch",
    }
    print(
        f"  {NAME}: {case} fullres {manifest['shape']} -> box {shape} "
        f"({out['voxel_ratio']:.1f}x fewer voxels); storage {full / 2**20:.0f} MiB uncropped "
        f"(+{prev / 2**20:.0f} MiB previous stage) vs {cropped / 2**20:.0f} MiB cropped: "
        f"{out['storage_ratio']:.1f}x ({out['storage_ratio_with_previous_stage']:.1f}x with the "
        f"previous stage), goal {STORAGE_GOAL:.0f}x; time ratio in the table (goal {GOAL:.0f}x)"
    )
    return out
