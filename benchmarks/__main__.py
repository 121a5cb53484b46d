"""``python -m benchmarks [--quick] [--runs N] [--only a,b]``: kitsnet vs nnU-Net side by side.

Runs each benchmark (see ``benchmarks/harness.py`` for the protocol) on identical inputs for
kitsnet and the peer, alternating the two, and writes the medians, spreads, peak memory and the
ratio (peer time / kitsnet time) to ``benchmarks/results/<timestamp>.json``, then prints a table.
``--quick`` shrinks every input so the whole set runs in a few minutes (a smoke test of the
benchmarks themselves, not the figures to quote).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.harness import BENCHMARKS, machine, run_benchmark, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="runs per side (default 5, quick 1)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results",
        help="folder for <timestamp>.json",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    runs = args.runs or (1 if args.quick else 5)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpus']} cpus, {info['memory_gib']} GiB, "
          f"torch {info['torch']}, nnunetv2 {info['nnunetv2']}, quick={args.quick}")
    entries = []
    t0 = time.time()
    for name in names:
        print(f"== {name}")
        sys.stdout.flush()
        entries.append(run_benchmark(name, args.quick, runs, args.timeout))
    result = {
        "machine": info,
        "quick": args.quick,
        "wall_s": time.time() - t0,
        "benchmarks": entries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out / f"{stamp}{'-quick' if args.quick else ''}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print()
    print(table(entries))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
