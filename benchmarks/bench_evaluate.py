"""Benchmark: ``kitsnet.evaluate`` vs the literal whole-volume KiTS21 computation.

Runs both on the 24 real full-size pairs of the KiTS21 label maps in $KITSNET_KITS21_LABELS
(AND and OR aggregations scored against MAJ) in one process, and prints per-pair times,
totals, the speed-up and the largest absolute difference over all 6 metrics (the requirement
is <= 1e-9 and >= 5x).

    python -m benchmarks.bench_evaluate [--data DIR] [--jobs N] [--json OUT]

Timings include reading both NIfTI files on both sides (the official ``compute_metrics_for_case``
reads its files too); the load-only time is printed so compute-only ratios can be derived.
Both sides run serially, one case at a time; ``--jobs`` adds a parallel run of our code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from kitsnet.dataset import LABEL_MAPS_ENV, aggregated_label_maps, label_maps_from_env
from kitsnet.evaluate import (
    METRIC_COLUMNS,
    evaluate_pairs,
    reference_score_case,
    score_case,
)
from kitsnet.io import atomic_path, load_volume

TOLERANCE = 1e-9

# The side-by-side protocol of ``python -m benchmarks`` (see benchmarks/harness.py): one
# full-size pair, kitsnet's ``score_case`` against the literal official computation.
NAME = "evaluate"
GOAL = 5.0
PEER = "official KiTS21 metrics (whole-volume surface-distance, kitsnet.evaluate.reference_*)"
WHAT = "score case_00160 OR vs MAJ (the largest of the 12 real label maps), file reading included"


def skip_reason() -> str | None:
    """None when the real label maps are there, else why the benchmark cannot run."""
    maps, why = label_maps_from_env()
    if not maps:
        return why
    if not {"MAJ", "OR"} <= set(maps.get("case_00160", {})):
        return f"case_00160's MAJ and OR label maps are not among ${LABEL_MAPS_ENV}'s"
    return None


def setup(quick: bool) -> tuple[str, Path, Path]:
    """The largest pair (smallest in quick mode); files read once to warm the page cache."""
    pairs = real_pairs(label_maps_from_env()[0])
    pairs.sort(key=lambda p: p[2].stat().st_size)
    case, pred, ref = pairs[0] if quick else [p for p in pairs if p[0] == "case_00160_OR"][0]
    pred.read_bytes(), ref.read_bytes()
    return case, pred, ref


def run_kitsnet(pair: tuple[str, Path, Path]) -> dict:
    return score_case(*pair)


def run_peer(pair: tuple[str, Path, Path]) -> dict:
    return reference_score_case(*pair)


def check(quick: bool) -> dict:
    """Largest difference over the six metrics of the timed pair."""
    pair = setup(quick)
    ours, official = run_kitsnet(pair), run_peer(pair)
    diff = max(abs(ours[c] - official[c]) for c in METRIC_COLUMNS)
    return {"max_abs_diff": diff, "tolerance": TOLERANCE}


def real_pairs(maps: dict[str, dict[str, Path]]) -> list[tuple[str, Path, Path]]:
    """Every case's AND and OR label map with its MAJ reference, named ``<case>_<agg>``."""
    pairs = []
    for case, files in sorted(maps.items()):
        for agg in ("AND", "OR"):
            if "MAJ" in files and agg in files:
                pairs.append((f"{case}_{agg}", files[agg], files["MAJ"]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=os.environ.get(LABEL_MAPS_ENV),
        help=f"KiTS21 label maps (a clone's data folder or flat files; default ${LABEL_MAPS_ENV})",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    if args.data is None or not Path(args.data).is_dir():
        print(f"no label maps at {args.data} (--data or ${LABEL_MAPS_ENV})", file=sys.stderr)
        return 2
    pairs = real_pairs(aggregated_label_maps(args.data))
    print(f"{len(pairs)} pairs from {args.data}")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    # Reading all files once first also warms the page cache for both timed runs.
    t0 = time.perf_counter()
    for _, pred, ref in pairs:
        load_volume(pred)
        load_volume(ref)
    t_load = time.perf_counter() - t0

    rows = []
    t_ours = t_ref = 0.0
    max_diff = 0.0
    print(f"{'pair':18s} {'ours s':>8s} {'reference s':>12s} {'ratio':>7s} {'max |diff|':>11s}")
    for case, pred, ref in pairs:
        t0 = time.perf_counter()
        ours = score_case(case, pred, ref)
        t1 = time.perf_counter()
        official = reference_score_case(case, pred, ref)
        t2 = time.perf_counter()
        diff = max(abs(ours[c] - official[c]) for c in METRIC_COLUMNS)
        max_diff = max(max_diff, diff)
        t_ours += t1 - t0
        t_ref += t2 - t1
        rows.append({"pair": case, "ours_s": t1 - t0, "reference_s": t2 - t1, "max_abs_diff": diff})
        ratio = (t2 - t1) / (t1 - t0)
        print(f"{case:18s} {t1 - t0:8.2f} {t2 - t1:12.2f} {ratio:7.1f} {diff:11.2e}")
        sys.stdout.flush()

    t0 = time.perf_counter()
    evaluate_pairs(pairs, jobs=args.jobs)
    t_par = time.perf_counter() - t0

    print()
    print(f"reading both files, all pairs:        {t_load:8.1f} s")
    print(f"ours, serial (incl. reading):         {t_ours:8.1f} s")
    print(f"{f'ours, evaluate_pairs jobs={args.jobs}:':38s}{t_par:8.1f} s")
    print(f"reference, serial (incl. reading):    {t_ref:8.1f} s")
    print(f"speed-up serial vs serial:            {t_ref / t_ours:8.1f} x")
    compute_ratio = (t_ref - t_load) / max(t_ours - t_load, 1e-9)
    print(f"speed-up compute only (minus reading): {compute_ratio:7.1f} x")
    print(f"speed-up reference serial vs ours jobs={args.jobs}: {t_ref / t_par:.1f} x")
    print(f"max |ours - reference| over {len(pairs)} pairs x 6 metrics: {max_diff:.3e}")
    ok = max_diff <= TOLERANCE
    print("values identical within 1e-9" if ok else "VALUES DIFFER by more than 1e-9")

    if args.json is not None:
        summary = {
            "pairs": rows,
            "load_s": t_load,
            "ours_serial_s": t_ours,
            "ours_parallel_s": t_par,
            "jobs": args.jobs,
            "reference_serial_s": t_ref,
            "speedup_serial": t_ref / t_ours,
            "max_abs_diff": max_diff,
            "cpus": os.cpu_count(),
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
