"""Benchmark ``ensemble_storage``: bytes per case of the probabilities that ensembling needs,
kitsnet's compact .npz vs nnU-Net's ``--save_probabilities`` .npz, and the ensemble's arg-max.

A real-geometry case (the KiTS21 label map of case_00003: 270 x 512 x 512 at 1 x 0.855 mm)
with logits made from its labels on two grids, as two configurations would predict them:
3d_fullres-like at 0.78 mm and 3d_lowres-like at 1.99 mm (each class: 8 x (2 x the
Gaussian-smoothed indicator - 1) plus smooth and voxel noise, so background is certain far
from the kidneys and the classes blend over a few voxels at their borders, and the float32
probabilities have a trained network's noisy low-order bits).  Timed: the export of member A to
the original grid with its probabilities written: kitsnet ``export_logits`` +
``save_probabilities`` + the segmentation NIfTI; nnU-Net its own
``export_prediction_from_logits(save_probabilities=True)`` (segmentation, .npz, .pkl).
``extra``: the .npz bytes of each side, ``storage_ratio`` (goal 10).  ``check``: the two-member
ensemble from kitsnet's compact files (``ensemble_argmax``) vs nnU-Net's float32 ensemble
(``average_probabilities`` of its own exported probabilities, arg-max).  Quick: case_00287 with
every 4th row and column, grids 2 and 4 mm.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cached
from benchmarks.common import peer_available as peer_available
from benchmarks.inputs import label_map, missing_label_maps

NAME = "ensemble_storage"
STORAGE_GOAL = 10.0
MAX_RUNS = 1  # the bytes are deterministic; nnU-Net's export takes minutes on the full case
PEER = "nnU-Net v2.8.1 export_prediction_from_logits(save_probabilities=True)"
VERSION = "v1"
FULL = {"case": "case_00003", "step": 1, "grids": (0.78125, 1.99)}
QUICK = {"case": "case_00287", "step": 4, "grids": (2.0, 4.0)}
WHAT = (
    f"probabilities of real-geometry {FULL['case']} (logits from its labels at 0.78 mm, to its "
    "original grid): compact .npz vs nnU-Net's --save_probabilities .npz; 2-member ensemble"
)


def skip_reason() -> str | None:
    return missing_label_maps([FULL["case"], QUICK["case"]])


def _logits(seg: np.ndarray, spacing: list[float], grid: float, seed: int) -> np.ndarray:
    """(4, *grid shape) float32 logits of a confident network that saw ``seg``."""
    from scipy import ndimage

    shape = [round(n * s / grid) for n, s in zip(seg.shape, spacing, strict=True)]
    labels = ndimage.zoom(seg, [n / o for n, o in zip(shape, seg.shape, strict=True)], order=0)
    rng = np.random.default_rng(seed)
    out = np.empty((4, *labels.shape), np.float32)
    for c in range(4):
        soft = ndimage.gaussian_filter((labels == c).astype(np.float32), 1.0 + seed / 2)
        small = rng.standard_normal([max(2, n // 16) for n in labels.shape]).astype(np.float32)
        zoom = [n / m for n, m in zip(labels.shape, small.shape, strict=True)]
        out[c] = 8 * (2 * soft - 1) + 1.5 * ndimage.zoom(small, zoom, order=1)
        out[c] += 0.3 * rng.standard_normal(labels.shape, dtype=np.float32)
    return out


def _write(root: Path, sizes: dict[str, Any]) -> None:
    """The original grid (``case.json``) and both members' logits (``member_{a,b}.npy``)."""
    import nibabel as nib

    img = nib.load(label_map(sizes["case"]))
    step = sizes["step"]
    seg = np.asarray(img.dataobj, dtype=np.uint8)[:, ::step, ::step]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = [zooms[0], zooms[1] * step, zooms[2] * step]
    for member, grid in zip("ab", sizes["grids"], strict=True):
        np.save(root / f"member_{member}.npy", _logits(seg, spacing, grid, "ab".index(member)))
    case = {"shape": list(seg.shape), "spacing": spacing, "grids": list(sizes["grids"])}
    (root / "case.json").write_text(json.dumps({**case, "case": sizes["case"]}))


def _case(quick: bool) -> dict[str, Any]:
    """The cached inputs' folder and the original grid (the logits stay on disk)."""
    sizes = QUICK if quick else FULL
    key = f"{VERSION}-{sizes['case']}-{'quick' if quick else 'full'}"
    root = cached(NAME, key, lambda tmp: _write(tmp, sizes))
    return {"root": root, **json.loads((root / "case.json").read_text())}


def setup(quick: bool) -> dict[str, Any]:
    inputs = _case(quick)
    return {**inputs, "logits": np.load(inputs["root"] / "member_a.npy")}


def _out(inputs: dict[str, Any], side: str) -> Path:
    out = inputs["root"] / "out" / side
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def run_kitsnet(inputs: dict[str, Any]) -> dict[str, Path]:
    from kitsnet.core.io import save_volume
    from kitsnet.predict.probabilities import export_logits, save_probabilities

    out, spacing = _out(inputs, "kitsnet"), inputs["spacing"]
    grid = [inputs["grids"][0]] * 3
    seg, cp = export_logits(inputs["logits"], inputs["shape"], grid, 3.0, spacing)
    save_probabilities(out / f"{inputs['case']}.npz", cp)
    save_volume(seg, out / f"{inputs['case']}.nii.gz", np.diag([*spacing, 1.0]), spacing=spacing)
    box = np.prod([hi - lo for lo, hi in cp.box]) / np.prod(cp.shape)
    return {"folder": out, "probabilities": out / f"{inputs['case']}.npz", "box_fraction": box}


def _nnunet_export(logits, inputs, grid: float, out_truncated: str) -> None:
    """nnU-Net's export of one member to the original grid: segmentation, .npz and .pkl."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from benchmarks.common import kitsnet_plan
    from tests.reference.nnunet_plans import dataset_json, plans_manager

    plan = kitsnet_plan("3d_fullres", [grid] * 3)
    pm, shape, spacing = plans_manager(plan), list(inputs["shape"]), inputs["spacing"]
    props = {"spacing": spacing, "bbox_used_for_cropping": [[0, s] for s in shape]}
    props.update(shape_after_cropping_and_before_resampling=shape, shape_before_cropping=shape)
    direction = tuple(np.eye(3).ravel())
    props["sitk_stuff"] = {"spacing": spacing[::-1], "origin": (0.0,) * 3, "direction": direction}
    threads = int(os.environ.get("KITSNET_THREADS", os.cpu_count() or 1))
    configuration = pm.get_configuration("3d_fullres")
    export_prediction_from_logits(
        logits, props, configuration, pm, dataset_json(), out_truncated, True, threads
    )


def run_peer(inputs: dict[str, Any]) -> dict[str, Path]:
    out = _out(inputs, "peer")
    _nnunet_export(inputs["logits"], inputs, inputs["grids"][0], str(out / inputs["case"]))
    return {"folder": out, "probabilities": out / f"{inputs['case']}.npz"}


def figures(output: dict[str, Any]) -> dict[str, Any]:
    """Bytes written: the probabilities' .npz, and all files (with the segmentation)."""
    files = {p.name: p.stat().st_size for p in output["folder"].iterdir()}
    out = {"probabilities_bytes": output["probabilities"].stat().st_size, "files": files}
    if "box_fraction" in output:
        out["box_fraction"] = float(output["box_fraction"])
    return out


def describe(f: dict[str, Any]) -> str:
    box = f" (box: {f['box_fraction']:.1%} of the grid)" if "box_fraction" in f else ""
    files = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in f["files"].items())
    return f"probabilities {f['probabilities_bytes'] / 2**20:.2f} MiB{box}; files: {files}"


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    """Bytes per case of each side's probabilities and their ratio (printed: the table's ratio
    column is the time's)."""
    inputs = _case(quick)
    root, case, n = inputs["root"], inputs["case"], int(np.prod(inputs["shape"]))
    ours = (root / "out" / "kitsnet" / f"{case}.npz").stat().st_size
    peer_file = root / "out" / "peer" / f"{case}.npz"
    peer = peer_file.stat().st_size if peer_file.is_file() else None
    out = {
        "case": case,
        "original_shape": inputs["shape"],
        "original_spacing": inputs["spacing"],
        "kitsnet_bytes": ours,
        "nnunet_bytes": peer,
        "float32_uncompressed_bytes": 4 * 4 * n,
        "storage_ratio": peer / ours if peer else None,
        "storage_goal_ratio": STORAGE_GOAL,
        "storage_goal_met": peer / ours >= STORAGE_GOAL if peer else None,
        "ratio_means": "nnU-Net s / kitsnet s: exporting member A with its probabilities",
    }
    vs = f"nnU-Net {peer / 2**20:.1f} MiB: {peer / ours:.0f}x smaller" if peer else "no nnU-Net"
    print(
        f"  {NAME}: {case} {inputs['shape']} at {inputs['spacing']} mm: compact "
        f"{ours / 2**20:.2f} MiB vs {vs} (goal {STORAGE_GOAL:.0f}x; float32 uncompressed "
        f"{out['float32_uncompressed_bytes'] / 2**20:.0f} MiB)"
    )
    return out


def check(quick: bool) -> dict[str, Any]:
    """Two-member ensemble: kitsnet's arg-max from its compact files vs nnU-Net's arg-max of
    its ``average_probabilities`` of the members' float32 probabilities it exported."""
    from nnunetv2.ensembling.ensemble import average_probabilities

    from kitsnet.predict.averaging import ensemble_argmax
    from kitsnet.predict.probabilities import (
        export_logits,
        load_probabilities,
        save_probabilities,
    )

    inputs = _case(quick)
    tmp = Path(tempfile.mkdtemp(prefix="ensemble-check-", dir=inputs["root"]))
    try:
        theirs, ours = [], []
        for member, grid in zip("ab", inputs["grids"], strict=True):
            logits = np.load(inputs["root"] / f"member_{member}.npy")
            _nnunet_export(logits, inputs, grid, str(tmp / member))
            theirs.append(str(tmp / f"{member}.npz"))
            _, cp = export_logits(logits, inputs["shape"], [grid] * 3, 3.0, inputs["spacing"])
            save_probabilities(tmp / f"{member}_compact.npz", cp)
            ours.append(tmp / f"{member}_compact.npz")
            del logits, cp
        seg = ensemble_argmax([load_probabilities(p) for p in ours])
        ref = average_probabilities(theirs).argmax(0)
        return {
            "ensemble_argmax_agreement": float((seg == ref).mean()),
            "differing_voxels": int((seg != ref).sum()),
            "foreground_voxels": int((ref > 0).sum()),
            "voxels": int(ref.size),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
