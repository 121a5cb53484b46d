"""``python -m benchmarks.paper_step``: the paper's plans, arrays and training steps at full size.

The demo proves the method learns at a small scale; this checks that the paper's own settings
(config/kits21.yaml) run on real-size data on this machine, through the workflow's functions:
``make_plan`` on the fingerprint of the real KiTS21 label maps ($KITSNET_KITS21_LABELS),
``preprocess_case`` of one real label map (with CT-like intensities painted from its labels,
since the KiTS21 imaging is not available here) for every data kind, and ``train_fold`` of the
paper's 3d_fullres plan (6 stages, 128^3 patches from a 205^3 region, batch 2, full
augmentation) for a few iterations and one validation batch, on the CPU.  Prints one line per
step with its wall time, the sizes it produced and the process's peak memory, and writes them as
JSON to ``benchmarks/results/paper_step-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
HU = {0: -100.0, 1: 160.0, 2: 110.0, 3: 10.0}  # enhancing kidney, tumour, near-water cyst


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def label_map(case: str) -> Path:
    """The real KiTS21 (majority-vote) label map of ``case``, from $KITSNET_KITS21_LABELS."""
    from kitsnet.dataset import label_maps_from_env

    return label_maps_from_env()[0][case]["MAJ"]


def missing_label_maps(cases: list[str]) -> str | None:
    """Why a benchmark on these real label maps cannot run here, or None."""
    from kitsnet.dataset import LABEL_MAPS_ENV, label_maps_from_env

    maps, why = label_maps_from_env()
    if not maps:
        return why
    missing = [c for c in cases if "MAJ" not in maps.get(c, {})]
    if missing:
        return f"KiTS21 label maps missing from ${LABEL_MAPS_ENV}: {', '.join(missing)}"
    return None


def real_geometry_fingerprint() -> dict:
    """A dataset fingerprint from the shapes and spacings of all real label maps, with CT-like
    foreground intensity statistics (those of ``painted_case``'s images), for planning."""
    import nibabel as nib

    from kitsnet.dataset import label_maps_from_env

    maps = label_maps_from_env()[0]
    headers = [nib.load(m["MAJ"]).header for m in maps.values() if "MAJ" in m]
    fi = {"mean": 100.0, "std": 75.0, "percentile_00_5": -100.0, "percentile_99_5": 250.0}
    return {
        "shapes": [[int(s) for s in h.get_data_shape()] for h in headers],
        "spacings": [[float(z) for z in h.get_zooms()] for h in headers],
        "foreground_intensity": fi,
    }


def _real_case(case: str, out: Path) -> tuple[Path, Path]:
    """One real label map and a CT-like image painted from it, in KiTS21's layout."""
    import nibabel as nib

    return painted_case(nib.load(label_map(case)), case, out)


def painted_case(lab, case: str, out: Path) -> tuple[Path, Path]:
    """``out/case`` in KiTS21's layout from a label map (a nibabel image): the labels and a
    CT-like image painted from them (HU per class, noise, some air)."""
    import nibabel as nib

    seg = np.asarray(lab.dataobj).astype(np.uint8)
    rng = np.random.default_rng(0)
    img = np.vectorize(HU.get, otypes=[np.float32])(seg) + rng.normal(0, 25, seg.shape)
    img[:, :20] = -1000.0  # some air, as validate expects of a CT
    folder = out / case
    folder.mkdir(parents=True)
    image, label = folder / "imaging.nii.gz", folder / "aggregated_MAJ_seg.nii.gz"
    nib.save(nib.Nifti1Image(img.astype(np.float32), lab.affine, lab.header), image)
    nib.save(nib.Nifti1Image(seg, lab.affine, lab.header), label)
    return image, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="case_00057", help="which real label map to use")
    parser.add_argument("--iterations", type=int, default=2, help="training iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configuration",
        choices=("3d_fullres", "3d_cascade_roi"),
        default="3d_fullres",
        help="which paper configuration takes the training step",
    )
    args = parser.parse_args(argv)
    import torch

    from kitsnet.plan import make_plan
    from kitsnet.preprocess import preprocess_case
    from kitsnet.roi import crop_case
    from kitsnet.train import train_fold

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())
    fp = real_geometry_fingerprint()
    report: dict = {"case": args.case, "plans": {}, "preprocess": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image, label = _real_case(args.case, root / "data")
        for name in ("2d", "3d_lowres", "3d_fullres"):
            plan = make_plan(name, fp, copy.deepcopy(cfg))
            arch = plan["arch"]
            report["plans"][name] = {
                "spacing": plan["spacing"],
                "patch": plan["patch_size"],
                "batch": plan["batch_size"],
                "stages": len(arch["strides"]),
                "features": arch["features_per_stage"],
            }
            out = root / "pre" / name
            out.mkdir(parents=True)
            t0 = time.perf_counter()
            files = [out / f"{args.case}{x}" for x in ("_image.npy", "_seg.npy", ".json")]
            preprocess_case(image, label, args.case, plan, *files)
            shape = json.loads(files[2].read_text())["shape"]
            mb = sum(f.stat().st_size for f in files) / 2**20
            report["preprocess"][name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "shape": shape,
                "mib": round(mb, 1),
            }
            print(f"plan + preprocess {name}: {report['plans'][name]} -> {shape}, {mb:.0f} MiB, "
                  f"{report['preprocess'][name]['seconds']} s, peak {_peak_mib():.0f} MiB")
        plan = make_plan(args.configuration, fp, copy.deepcopy(cfg))
        data = root / "pre" / "3d_fullres"
        if args.configuration == "3d_cascade_roi":
            # the case cropped to its first stage's box, its own labels standing in for the
            # lowres stage's out-of-fold segmentation
            data = root / "pre" / "3d_cascade_roi"
            fullres = [data.parent / "3d_fullres" / f"{args.case}{x}"
                       for x in ("_image.npy", "_seg.npy", ".json")]
            boxes = crop_case(args.case, *fullres, fullres[1], plan, data / args.case)
            report["crop"] = [list(b.shape) for b in boxes]
            print(f"crop_roi: boxes {report['crop']}, peak {_peak_mib():.0f} MiB")
        # this machine's threads (workers: auto = threads - 1), not the paper's GPU node's 8
        training = dict(cfg["training"], epochs=1, iterations_per_epoch=args.iterations,
                        val_iterations=1, checkpoint_every=1, device="cpu",
                        threads=args.threads)
        splits = [{"train": [args.case], "val": [args.case]}]
        t0 = time.perf_counter()
        train_fold(plan, splits, 0, data, root / "model", training,
                   cfg["augmentation"], seed=0, device="cpu", log=print)
        seconds = time.perf_counter() - t0
        report["train"] = {
            "configuration": args.configuration,
            "iterations": args.iterations,
            "val_batches": 1,
            "seconds": round(seconds, 1),
            "peak_mib": round(_peak_mib()),
            "threads": args.threads,
        }
        print(f"train_fold {args.configuration}: {args.iterations} iterations + 1 validation "
              f"batch in {seconds:.0f} s, peak {_peak_mib():.0f} MiB")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"paper_step-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
