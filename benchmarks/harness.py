"""Side-by-side timing of kitsnet and a peer (nnU-Net v2, or the official KiTS21 scoring).

Every measurement runs in a fresh child process (``python -m benchmarks.child``) so that
neither side inherits the other's caches, allocator state or threads, and so the peak resident
memory of the measured call can be read cleanly: the child builds its inputs, resets the
kernel's high-water mark (``/proc/self/clear_refs``, value 5), times one call, and reports
``VmHWM``.  The parent alternates the two sides (kitsnet first on even rounds, the peer first on
odd rounds) so slow drifts of the machine (thermal, other load) hit both equally.

A benchmark module ``benchmarks/bench_<name>.py`` defines:

- ``NAME`` (str), ``GOAL`` (float: required nnU-Net time / kitsnet time), ``WHAT`` (one line);
- ``setup(quick: bool) -> inputs``: deterministic inputs (seeded), identical for both sides;
- ``run_kitsnet(inputs)`` and ``run_peer(inputs)``: the timed work; they return the output;
- optionally ``skip_reason() -> str | None`` (why the whole benchmark cannot run here),
  ``THREADS`` (int: torch/BLAS threads for both sides; default all cores), ``MAX_RUNS`` (cap
  on runs for long benchmarks), ``LIMIT_MB`` (a peak-memory limit to report against),
  ``PEER`` (what the peer is, default "nnU-Net v2.8.1"), ``peer_available() -> str | None``
  (None when the peer can run, else the reason it cannot), ``check(quick) -> dict`` (agreement
  figures of the two outputs, run once in its own child) and ``extra(seconds, quick) -> dict``
  (derived figures such as patches per second per core, computed from a kitsnet timing);
- optionally ``prepare_kitsnet(inputs)`` / ``prepare_peer(inputs)``: untimed work before the
  timed call (e.g. starting worker processes and pulling warm-up batches); its return value is
  what ``run_kitsnet`` / ``run_peer`` then get, and ``finish(prepared)``, when defined, is
  called after the timing (e.g. to stop those workers);
- optionally ``TREE_MEMORY = True`` for work that runs in several processes: ``peak_mb`` is then
  the peak, sampled every 50 ms during the timed call, of the summed PSS of the child and all
  its descendant processes (``/proc/<pid>/smaps_rollup``; VmRSS where that is missing), and
  ``inputs_mb`` that sum just before the call, instead of the child's own VmHWM / VmRSS
  (also reported: the peak without file-backed pages, and the tree's CPU seconds).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCHMARKS = (
    "preprocess", "export", "sliding_window", "augment", "evaluate", "memory", "train_input",
    "cascade_roi",
)
TREE_SAMPLE_S = 0.05
TREE_MEMORY_MEANS = (
    "process-tree PSS peak: child + all descendant processes, sampled every 50 ms by a nice-19 "
    "thread (*_memory_samples: how many samples it got); "
    "*_peak_anon_mb: the same without file-backed pages (memory-mapped cases); *_cpu_s: CPU "
    "seconds of that process tree during the timed call (median), cpu_ratio: peer / kitsnet"
)


def module(name: str):
    return importlib.import_module(f"benchmarks.bench_{name}")


def thread_env(threads: int) -> dict[str, str]:
    """The same thread counts for every library on both sides."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KITSNET_THREADS"):
        env[var] = str(threads)
    return env


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss_kb(pid: int) -> tuple[int, int]:
    """Proportional set size of one process in KiB (VmRSS where smaps_rollup is missing), and
    the part of it not backed by files (``Pss_Anon`` + ``Pss_Shmem``; RssAnon + RssShmem)."""
    for name, total, parts in (
        ("smaps_rollup", "Pss", ("Pss_Anon", "Pss_Shmem")),
        ("status", "VmRSS", ("RssAnon", "RssShmem")),
    ):
        try:
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
            pairs = (ln.split(":", 1) for ln in lines if ":" in ln)
            fields = {k: int(v.split()[0]) for k, v in pairs if k == total or k in parts}
        except (OSError, ValueError, IndexError):
            continue
        if total in fields:
            return fields[total], sum(fields.get(k, 0) for k in parts)
    return 0, 0


def tree_pss_mb(root: int | None = None) -> tuple[float, float]:
    """Summed PSS of ``root`` (default: this process) and its descendants, in MiB, and the
    summed part of it not backed by files (anonymous and shared memory)."""
    sums = [_pss_kb(p) for p in _descendants(root or os.getpid())]
    return sum(x for x, _ in sums) / 1024, sum(y for _, y in sums) / 1024


def _tree_cpu_s(root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) so far of ``root`` and each of its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in _descendants(root or os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


class TreeMemory:
    """Peaks of :func:`tree_pss_mb`, sampled in a background thread while the block runs, and
    the CPU seconds the process tree spent meanwhile (``cpu_s``: processes alive at the end,
    less the sampling thread's own time).

    Reading smaps_rollup walks the page tables of every mapping (milliseconds for a process
    with GBs of memory-mapped cases), so the sampling thread runs at the lowest priority
    (nice 19, Linux): where the measured processes use every core it takes its CPU time from
    idle time and samples less often (``samples`` says how many it took) rather than slowing
    them down."""

    def __enter__(self) -> TreeMemory:
        self.peak, self.peak_anon = tree_pss_mb()
        self.samples = 1
        self._own_cpu = 0.0
        self._cpu0 = _tree_cpu_s()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        total, anon = tree_pss_mb()
        self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
        self.samples += 1

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        except (OSError, AttributeError):
            pass
        while not self._stop.wait(TREE_SAMPLE_S):
            self._sample()
        self._own_cpu = time.thread_time()

    def __exit__(self, *exc) -> None:
        cpu1 = _tree_cpu_s()
        self._stop.set()
        self._thread.join()
        spent = sum(c - self._cpu0.get(pid, 0.0) for pid, c in cpu1.items())
        self.cpu_s = spent - self._own_cpu
        self._sample()


def child_measure(name: str, side: str, quick: bool) -> dict[str, Any]:
    """Run inside the child: set up (and prepare), reset the peak, time one call, report."""
    import torch

    threads = int(os.environ.get("KITSNET_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    mod = module(name)
    if side == "check":
        return {"check": mod.check(quick)}
    inputs = mod.setup(quick)
    fn = mod.run_kitsnet if side == "kitsnet" else mod.run_peer
    prepare = getattr(mod, f"prepare_{side}", None)
    if prepare is not None:
        inputs = prepare(inputs)
    tree = None
    if getattr(mod, "TREE_MEMORY", False):
        base = tree_pss_mb()[0]
        with TreeMemory() as tree:
            t0 = time.perf_counter()
            out = fn(inputs)
            seconds = time.perf_counter() - t0
        peak = tree.peak
    else:
        base = rss_mb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        out = fn(inputs)
        seconds = time.perf_counter() - t0
        peak = rss_mb("VmHWM")
    del out
    if prepare is not None and hasattr(mod, "finish"):
        mod.finish(inputs)
    result = {"seconds": seconds, "peak_mb": peak, "inputs_mb": base, "threads": threads}
    if tree is not None:
        result.update(
            {"peak_anon_mb": tree.peak_anon, "memory_samples": tree.samples, "cpu_s": tree.cpu_s}
        )
    return result


def spawn(name: str, side: str, quick: bool, threads: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.child", name, side] + (["--quick"] if quick else [])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        cmd, cwd=root, env=thread_env(threads), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark {name} ({side}) failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def run_benchmark(
    name: str, quick: bool, runs: int, timeout: float, log=print
) -> dict[str, Any]:
    """Alternate kitsnet and peer ``runs`` times each; medians, spreads, paired ratios."""
    mod = module(name)
    skip = mod.skip_reason() if hasattr(mod, "skip_reason") else None
    if skip:
        log(f"  {name}: skipped: {skip}")
        return {"name": name, "what": mod.WHAT, "skipped": skip, "runs": 0,
                "kitsnet_s": None, "peer_s": None, "ratio": None,
                "kitsnet_peak_mb": None, "peer_peak_mb": None}
    threads = int(getattr(mod, "THREADS", 0) or os.cpu_count() or 1)
    runs = min(runs, getattr(mod, "MAX_RUNS", runs))
    why_not = mod.peer_available() if hasattr(mod, "peer_available") else None
    has_peer = hasattr(mod, "run_peer") and why_not is None
    k_runs: list[dict] = []
    p_runs: list[dict] = []
    for r in range(runs):
        sides = ["kitsnet", "peer"] if r % 2 == 0 else ["peer", "kitsnet"]
        for side in sides:
            if side == "peer" and not has_peer:
                continue
            res = spawn(name, side, quick, threads, timeout)
            (k_runs if side == "kitsnet" else p_runs).append(res)
            log(f"  {name:15s} run {r + 1}/{runs} {side:8s} {res['seconds']:9.3f} s "
                f"peak {res['peak_mb']:8.0f} MiB")
    k_s = [x["seconds"] for x in k_runs]
    entry: dict[str, Any] = {
        "name": name,
        "what": mod.WHAT,
        "peer": getattr(mod, "PEER", "nnU-Net v2.8.1") if has_peer else None,
        "goal_ratio": getattr(mod, "GOAL", None),
        "threads": threads,
        "runs": runs,
        "kitsnet_s": statistics.median(k_s),
        "kitsnet_s_spread": summarise(k_s),
        "kitsnet_peak_mb": max(x["peak_mb"] for x in k_runs),
        "kitsnet_inputs_mb": k_runs[0]["inputs_mb"],
        "peer_s": None,
        "peer_peak_mb": None,
        "ratio": None,
    }
    if p_runs:
        p_s = [x["seconds"] for x in p_runs]
        paired = [p / k for p, k in zip(p_s, k_s, strict=True)]
        entry.update(
            {
                "peer_s": statistics.median(p_s),
                "peer_s_spread": summarise(p_s),
                "peer_peak_mb": max(x["peak_mb"] for x in p_runs),
                "peer_inputs_mb": p_runs[0]["inputs_mb"],
                "ratio": statistics.median(p_s) / statistics.median(k_s),
                "ratio_paired_spread": summarise(paired),
                "memory_ratio": max(x["peak_mb"] for x in p_runs) / entry["kitsnet_peak_mb"],
            }
        )
        entry["goal_met"] = entry["ratio"] >= entry["goal_ratio"] if entry["goal_ratio"] else None
    else:
        entry["peer_missing"] = why_not or "no peer for this benchmark"
    if getattr(mod, "TREE_MEMORY", False):
        entry["peak_mb_means"] = TREE_MEMORY_MEANS
        entry["kitsnet_peak_anon_mb"] = max(x["peak_anon_mb"] for x in k_runs)
        entry["kitsnet_memory_samples"] = [x["memory_samples"] for x in k_runs]
        entry["kitsnet_cpu_s"] = statistics.median(x["cpu_s"] for x in k_runs)
        if p_runs:
            entry["peer_peak_anon_mb"] = max(x["peak_anon_mb"] for x in p_runs)
            entry["peer_memory_samples"] = [x["memory_samples"] for x in p_runs]
            entry["peer_cpu_s"] = statistics.median(x["cpu_s"] for x in p_runs)
            entry["cpu_ratio"] = entry["peer_cpu_s"] / entry["kitsnet_cpu_s"]
    if getattr(mod, "LIMIT_MB", None):
        entry["limit_mb"] = mod.LIMIT_MB
        entry["within_limit"] = entry["kitsnet_peak_mb"] <= mod.LIMIT_MB
    if hasattr(mod, "extra"):
        entry.update(mod.extra(entry["kitsnet_s"], quick))
        if entry.get("patches") and entry["peer_s"]:
            entry["peer_patches_per_s_per_core"] = entry["patches"] / entry["peer_s"]
    if hasattr(mod, "check") and has_peer:
        entry["check"] = spawn(name, "check", quick, threads, timeout)["check"]
    return entry


def machine() -> dict[str, Any]:
    import platform

    import numpy
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        from importlib.metadata import version

        import nnunetv2  # noqa: F401

        info["nnunetv2"] = version("nnunetv2")
    except ImportError:
        info["nnunetv2"] = None
    return info


def fmt(v: float | None, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def table(entries: list[dict[str, Any]]) -> str:
    head = (
        f"{'benchmark':15s} {'kitsnet s':>10s} {'peer s':>10s} {'ratio':>6s} {'spread':>12s} "
        f"{'goal':>5s} {'kitsnet MiB':>11s} {'peer MiB':>9s}  runs"
    )
    lines = [head, "-" * len(head)]
    for e in entries:
        if e.get("skipped"):
            lines.append(f"{e['name']:15s} skipped: {e['skipped']}")
            continue
        sp = e.get("ratio_paired_spread")
        spread = f"{sp['min']:.2f}-{sp['max']:.2f}" if sp else "-"
        goal = e.get("goal_ratio")
        mark = "" if e.get("goal_met") is None else (" ok" if e["goal_met"] else " LOW")
        lines.append(
            f"{e['name']:15s} {fmt(e['kitsnet_s'], '10.3f')} {fmt(e['peer_s'], '10.3f')} "
            f"{fmt(e['ratio'], '6.2f')} {spread:>12s} {fmt(goal, '5.1f')} "
            f"{fmt(e['kitsnet_peak_mb'], '11.0f')} {fmt(e['peer_peak_mb'], '9.0f')}  "
            f"{e['runs']}{mark}"
        )
    return "\n".join(lines)
