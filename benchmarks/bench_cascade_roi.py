"""Benchmark ``cascade_roi``: the fullres stage on the first stage's region of interest
(``3d_cascade_roi``) vs on the whole volume (``3d_cascade_fullres``), time and storage.

One real-geometry case: a KiTS21 label map (``$KITSNET_KITS21_LABELS``, case_00057: 80 x 512 x
512 at 3 x 0.82 x 0.82 mm) with CT-like intensities painted from its labels
(``benchmarks.paper_step.painted_case``), preprocessed by ``kitsnet.preprocess.preprocess_case``
to the paper's fullres plan (``make_plan`` of config/kits21.yaml on the fingerprint of all the
real label maps: 0.78 mm, 128^3 patches, six stages).  Its label map on the fullres grid stands
in for the first stage's out-of-fold segmentation (what rule predict_lowres writes), so the box
is the one a perfect first stage gives: the kidneys and masses plus the config's 20 mm margin,
one box (``roi_boxes: single``).  ``kitsnet.roi.crop_case`` (rule crop_roi's function) crops the
case to it.

Both sides run ``kitsnet.infer.predict_fold`` -- the function rule predict runs -- on the CPU
from their own arrays to a label map on the original grid, with the same network: the paper's
topology (six stages, strides 2, 3^3 kernels, 128^3 patch) at a reduced width (4 to 32 feature
maps instead of 30 to 320, randomly initialised) so that a whole-volume prediction takes
minutes on 2 cores, not hours; the width scales both sides alike.  Inference: step 0.5,
Gaussian weighting, no mirroring (mirroring multiplies both sides' network time by 8),
``tile_batch`` 1.

- kitsnet ("cropped"): the ``3d_cascade_roi`` plan on the cropped case: the sliding window on
  the box with its previous stage, pasted onto the whole fullres grid, exported.
- peer ("uncropped"): the ``3d_cascade_fullres`` plan on the whole fullres case with the same
  previous stage as one-hot channels, exported.  Same weights (the plans differ only by the
  ``roi`` settings).

``ratio`` = uncropped seconds / cropped seconds (goal 5).  ``extra``: the bytes each side's
fullres stage keeps per case, ``storage_ratio`` = the uncropped fullres arrays (image, labels,
json) / the cropped item (image, labels, *its previous stage* and json; goal 4), and
``storage_ratio_with_previous_stage`` with the whole-grid previous stage counted on the
uncropped side too (what the cascade reads).  ``--quick``: a coarser grid (2 mm, 32^3 patches)
of a smaller case, for the smoke test only.

The arrays and models are written once to a cache folder in the temporary directory (keyed by
``VERSION`` and the sizes) and reused by every child process.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

NAME = "cascade_roi"
GOAL = 5.0
STORAGE_GOAL = 4.0
MAX_RUNS = 1  # about 5 minutes on 2 cores (the uncropped side: 256 tiles of 128^3)
PEER = "the same network on the whole volume (3d_cascade_fullres's path)"
VERSION = "v1"

REPO = Path(__file__).resolve().parents[1]
WIDTH = {"base_features": 4, "max_features_3d": 32}
FULL = {"case": "case_00057", "spacing": None, "patch": None}  # the paper's 0.78 mm, 128^3
QUICK = {"case": "case_00287", "spacing": [2.0, 2.0, 2.0], "patch": [32, 32, 32]}
INFERENCE = {"step_size": 0.5, "gaussian_sigma_scale": 0.125, "mirror": False, "tile_batch": 1}

WHAT = (
    f"predict_fold of real-geometry {FULL['case']} at 0.78 mm, the paper's 6-stage 128^3 "
    f"network at width {WIDTH['base_features']}-{WIDTH['max_features_3d']} (the same for both), "
    "no mirroring: cropped to the first stage's box + 20 mm vs the whole volume"
)


def _sizes(quick: bool) -> dict[str, Any]:
    return QUICK if quick else FULL


def skip_reason() -> str | None:
    from benchmarks.paper_step import missing_label_maps

    return missing_label_maps([FULL["case"], QUICK["case"]])


def peer_available() -> str | None:
    return None  # the peer is kitsnet's own uncropped path


def _plans(sizes: dict[str, Any]) -> dict[str, dict]:
    """The paper's 3d_cascade_roi and 3d_cascade_fullres plans (config/kits21.yaml on the
    fingerprint of the real label maps), at the reduced width; quick: a coarser grid."""
    import yaml

    from benchmarks.paper_step import real_geometry_fingerprint
    from kitsnet.plan import make_plan

    cfg = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())
    cfg["plan"].update(WIDTH)
    if sizes["spacing"]:
        cfg["plan"].update(fullres_spacing=sizes["spacing"], patch_size_3d=sizes["patch"])
    fp = real_geometry_fingerprint()
    names = ("3d_cascade_roi", "3d_cascade_fullres")
    return {name: make_plan(name, fp, copy.deepcopy(cfg)) for name in names}


def _write(root: Path, sizes: dict[str, Any]) -> None:
    """The case preprocessed (``full/``), its first stage (``prev/``), the crop (``roi/``) and
    one network saved under both plans (``models/``)."""
    import nibabel as nib
    import torch

    from benchmarks.paper_step import label_map, painted_case
    from kitsnet.checkpoint import save_torch
    from kitsnet.network import build_network
    from kitsnet.preprocess import preprocess_case
    from kitsnet.roi import crop_case

    case, plans = sizes["case"], _plans(sizes)
    for sub in ("src", "full", "prev", "roi", "models"):
        (root / sub).mkdir()
    image, label = painted_case(nib.load(label_map(case)), case, root / "src")
    files = [root / "full" / f"{case}{x}" for x in ("_image.npy", "_seg.npy", ".json")]
    preprocess_case(image, label, case, plans["3d_cascade_roi"], *files)
    shutil.rmtree(root / "src")
    shutil.copyfile(files[1], root / "prev" / f"{case}.npy")  # a perfect first stage
    crop_case(
        case,
        *files,
        root / "prev" / f"{case}.npy",
        plans["3d_cascade_roi"],
        root / "roi" / case,
        log=lambda *_: None,
    )
    plan = plans["3d_cascade_roi"]
    torch.manual_seed(0)
    net = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
    for name, p in plans.items():
        save_torch(
            {"state_dict": net.state_dict(), "plan": json.dumps(p)}, root / "models" / f"{name}.pt"
        )


def _cache(sizes: dict[str, Any]) -> Path:
    """The cache folder of these sizes, written on first use and renamed into place whole."""
    key = f"{VERSION}-{sizes['case']}-{'quick' if sizes['spacing'] else 'paper'}"
    root = Path(tempfile.gettempdir()) / f"kitsnet-bench-cascade_roi-{key}"
    if (root / "done").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        _write(tmp, sizes)
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def setup(quick: bool) -> dict[str, Any]:
    sizes = _sizes(quick)
    return {"root": _cache(sizes), "case": sizes["case"]}


def _predict(inputs: dict[str, Any], model: str, data: str, prev: bool) -> Path:
    from kitsnet.infer import predict_fold

    root = inputs["root"]
    out = root / "pred" / model  # overwritten by every run
    predict_fold(
        root / "models" / f"{model}.pt",
        [inputs["case"]],
        root / data,
        out,
        INFERENCE,
        prev_dirs=[root / "prev"] if prev else None,
        device="cpu",
        log=lambda *_: None,
    )
    return out


def run_kitsnet(inputs: dict[str, Any]) -> Path:
    """Cropped: the 3d_cascade_roi plan on the crop, pasted back and exported."""
    return _predict(inputs, "3d_cascade_roi", "roi", prev=False)


def run_peer(inputs: dict[str, Any]) -> Path:
    """Uncropped: the 3d_cascade_fullres plan on the whole fullres case."""
    return _predict(inputs, "3d_cascade_fullres", "full", prev=True)


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def extra(seconds: float, quick: bool) -> dict[str, Any]:
    """Storage per case of each side's fullres stage, and the box (printed, since the table
    has one ratio column: the time's)."""
    root = _cache(_sizes(quick))
    case = _sizes(quick)["case"]
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
