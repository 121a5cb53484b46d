"""Benchmark: ``kitsnet.evaluate`` vs the literal whole-volume KiTS21 computation (>= 5x, 1e-9).

One full-size pair in ``python -m benchmarks``; all 24 real pairs of $KITSNET_KITS21_LABELS with
``python -m benchmarks.bench_evaluate [--jobs N]``.  Both sides read their files, as KiTS21 does.
"""

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kitsnet.core.io import load_volume
from kitsnet.data.dataset import LABEL_MAPS_ENV, label_maps_from_env
from kitsnet.evaluate.folders import evaluate_pairs
from kitsnet.evaluate.metrics import METRIC_COLUMNS, score_case
from tests.reference.kits21_official import reference_score_case

NAME, GOAL, TOLERANCE = "evaluate", 5.0, 1e-9
PEER = "official KiTS21 metrics (whole-volume surface-distance, tests.reference.kits21_official)"
WHAT = "score case_00160 OR vs MAJ (the largest of the 12 real label maps), file reading included"
Pair = tuple[str, Path, Path]


def skip_reason() -> str | None:
    """None when the real label maps are there, else why the benchmark cannot run."""
    maps, why = label_maps_from_env()
    if maps and not {"MAJ", "OR"} <= set(maps.get("case_00160", {})):
        return f"case_00160's MAJ and OR label maps are not among ${LABEL_MAPS_ENV}'s"
    return None if maps else why


def setup(quick: bool) -> Pair:
    """The largest pair (smallest in quick mode); files read once to warm the page cache."""
    pairs = sorted(real_pairs(label_maps_from_env()[0]), key=lambda p: p[2].stat().st_size)
    case, pred, ref = pairs[0] if quick else [p for p in pairs if p[0] == "case_00160_OR"][0]
    pred.read_bytes(), ref.read_bytes()
    return case, pred, ref


def run_kitsnet(pair: Pair) -> dict:
    return score_case(*pair)


def run_peer(pair: Pair) -> dict:
    return reference_score_case(*pair)


def _diff(ours: dict, official: dict) -> float:
    return max(abs(ours[c] - official[c]) for c in METRIC_COLUMNS)


def check(quick: bool) -> dict:
    """Largest difference over the six metrics of the timed pair."""
    pair = setup(quick)
    return {"max_abs_diff": _diff(run_kitsnet(pair), run_peer(pair)), "tolerance": TOLERANCE}


def real_pairs(maps: dict[str, dict[str, Path]]) -> list[Pair]:
    """Every case's AND and OR label map with its MAJ reference, named ``<case>_<agg>``."""
    found = [(c, a) for c, f in sorted(maps.items()) for a in ("AND", "OR") if {a, "MAJ"} <= set(f)]
    return [(f"{c}_{a}", maps[c][a], maps[c]["MAJ"]) for c, a in found]


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    """All pairs: files read once (load time, warm cache), both sides serially, ours in --jobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    jobs = parser.parse_args(argv).jobs
    maps, why = label_maps_from_env()
    if not maps:
        parser.error(why)
    pairs = real_pairs(maps)
    load_s = _timed(lambda: [load_volume(f) for _, pred, ref in pairs for f in (pred, ref)])[0]
    rows = []
    for pair in pairs:
        (ours_s, ours), (ref_s, official) = _timed(run_kitsnet, pair), _timed(run_peer, pair)
        diff = _diff(ours, official)
        rows.append({"pair": pair[0], "ours_s": ours_s, "reference_s": ref_s, "max_abs_diff": diff})
        print(f"{pair[0]:18s} ours {ours_s:6.2f} s, reference {ref_s:7.2f} s, |diff| {diff:.2e}")
    out = {"load_s": load_s, "jobs": jobs, "cpus": os.cpu_count()}
    out["ours_parallel_s"] = _timed(evaluate_pairs, pairs, jobs)[0]
    out["ours_serial_s"] = sum(r["ours_s"] for r in rows)
    out["reference_serial_s"] = sum(r["reference_s"] for r in rows)
    out["speedup_serial"] = out["reference_serial_s"] / out["ours_serial_s"]
    out["max_abs_diff"] = max((r["max_abs_diff"] for r in rows), default=0.0)
    print(json.dumps(out, indent=2))
    return 0 if out["max_abs_diff"] <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
