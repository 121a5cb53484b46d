"""``python -m benchmarks.paper_step``: the paper's plans, arrays and training steps at full size.

Checks that config/kits21.yaml runs on real-size data here: ``make_plan`` on the real label
maps' geometry, ``preprocess_case`` of a painted real case for every data kind, and a few
iterations plus one validation batch of ``train_fold`` on the CPU; prints each step's time,
sizes and peak memory and writes them to ``benchmarks/results/paper_step-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, paper_config, paper_plans
from benchmarks.inputs import preprocessed_files, real_case


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _preprocess(case: str, plans: dict, root: Path) -> dict:
    """Every data kind's plan and preprocessing of the painted case: sizes, time, MiB."""
    from kitsnet.preprocess.case import preprocess_case

    image, label = real_case(case, root / "data")
    report: dict = {"case": case, "plans": {}, "preprocess": {}}
    for name in ("2d", "3d_lowres", "3d_fullres"):
        plan, arch = plans[name], plans[name]["arch"]
        sizes = {"spacing": plan["spacing"], "patch": plan["patch_size"]}
        sizes.update(batch=plan["batch_size"], stages=len(arch["strides"]))
        report["plans"][name] = {**sizes, "features": arch["features_per_stage"]}
        (root / "pre" / name).mkdir(parents=True)
        t0, files = time.perf_counter(), preprocessed_files(root / "pre" / name, case)
        preprocess_case(image, label, case, plan, *files)
        shape = json.loads(files[2].read_text())["shape"]
        mb, seconds = sum(f.stat().st_size for f in files) / 2**20, time.perf_counter() - t0
        report["preprocess"][name] = {
            "seconds": round(seconds, 1),
            "shape": shape,
            "mib": round(mb, 1),
        }
        print(
            f"plan + preprocess {name}: {report['plans'][name]} -> {shape}, {mb:.0f} MiB, "
            f"{round(seconds, 1)} s, peak {_peak_mib():.0f} MiB"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="case_00057", help="which real label map to use")
    parser.add_argument("--iterations", type=int, default=2, help="training iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configuration",
        choices=("3d_fullres", "3d_cascade_roi", "3d_fullres_regions"),
        default="3d_fullres",
        help="which paper configuration takes the training step",
    )
    args = parser.parse_args(argv)
    import torch

    from kitsnet.preprocess.roi import crop_case
    from kitsnet.train.loop import train_fold

    torch.set_num_threads(args.threads)
    cfg, plans = paper_config(), paper_plans(("2d", "3d_lowres", "3d_fullres", args.configuration))
    plan = plans[args.configuration]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = _preprocess(args.case, plans, root)
        data = root / "pre" / "3d_fullres"
        if args.configuration == "3d_cascade_roi":
            # cropped to its first stage's box; its own labels stand in for that stage's output
            fullres, data = preprocessed_files(data, args.case), root / "pre" / "3d_cascade_roi"
            boxes = crop_case(args.case, *fullres, fullres[1], plan, data / args.case)
            report["crop"] = [list(b.shape) for b in boxes]
            print(f"crop_roi: boxes {report['crop']}, peak {_peak_mib():.0f} MiB")
        # this machine's threads (workers: auto = threads - 1), not the paper's GPU node's 8
        training = dict(cfg["training"], epochs=1, iterations_per_epoch=args.iterations)
        training.update(val_iterations=1, checkpoint_every=1, device="cpu", threads=args.threads)
        splits, t0 = [{"train": [args.case], "val": [args.case]}], time.perf_counter()
        out, aug = root / "model", cfg["augmentation"]
        train_fold(plan, splits, 0, data, out, training, aug, seed=0, device="cpu", log=print)
        seconds = time.perf_counter() - t0
    report["train"] = {"configuration": args.configuration, "iterations": args.iterations}
    report["train"].update(val_batches=1, seconds=round(seconds, 1), peak_mib=round(_peak_mib()))
    report["train"]["threads"] = args.threads
    print(
        f"train_fold {args.configuration}: {args.iterations} iterations + 1 validation "
        f"batch in {seconds:.0f} s, peak {_peak_mib():.0f} MiB"
    )
    path = REPO / "benchmarks" / "results"
    path.mkdir(parents=True, exist_ok=True)
    path /= f"paper_step-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
