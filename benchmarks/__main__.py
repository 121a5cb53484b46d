"""``python -m benchmarks [--quick] [--runs N] [--only a,b]``: kitsnet vs nnU-Net side by side.

Runs each benchmark (see ``benchmarks/harness.py``) and writes the medians, spreads, peak memory
and the ratio (peer time / kitsnet time) to ``benchmarks/results/<timestamp>.json`` after every
benchmark (a run stopped by SIGTERM keeps what it measured), then prints a table; exit status 3:
a benchmark or its peer failed.  ``--quick``: small inputs, a smoke test, not figures to quote.
"""

from __future__ import annotations

import argparse
import json
import signal
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
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here / "results", help="<timestamp>.json")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if unknown := sorted(set(names) - set(BENCHMARKS)):
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    info, entries, rc, t0 = machine(), [], 0, time.time()
    print(
        f"machine: {info['cpu']}, {info['cpus']} cpus, {info['memory_gib']} GiB, torch "
        f"{info['torch']}, nnunetv2 {info['nnunetv2']}, cuda {info['cuda']}, quick={args.quick}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out / f"{stamp}{'-quick' if args.quick else ''}.json"
    # SIGTERM (e.g. timeout): end the running child's session (harness.spawn), then report
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        for name in names:
            print(f"== {name}", flush=True)
            runs = args.runs or (1 if args.quick else 5)
            entries.append(run_benchmark(name, args.quick, runs, args.timeout))
            result = {"machine": info, "quick": args.quick, "wall_s": time.time() - t0}
            out.with_suffix(".tmp").write_text(
                json.dumps({**result, "benchmarks": entries}, indent=2)
            )
            out.with_suffix(".tmp").replace(out)
    except SystemExit as stop:
        print(f"\nstopped (exit {stop.code}): the JSON has the benchmarks finished before")
        rc = int(stop.code or 1)
    print()
    print(table(entries))
    print(f"\nwritten {out}" if out.exists() else "\nno benchmark finished: no JSON")
    return rc or (3 if any(e.get("failed") or e.get("peer_failed") for e in entries) else 0)


if __name__ == "__main__":
    raise SystemExit(main())
