"""Side-by-side timing of kitsnet and a peer (nnU-Net v2, or the official KiTS21 scoring).

Every measurement runs in a fresh child process (``python -m benchmarks.child``) in its own
session, so neither side inherits the other's caches, allocator state or threads, a time-out or
crash ends all it started and costs its benchmark only (``failed``), and the peak memory of the
call reads cleanly (the child resets the kernel's high-water mark, times one call, reports
``VmHWM``).  The parent alternates the sides so that slow drifts of the machine hit both.

A benchmark (``benchmarks/bench_<name>.py``, or an object in one: ``GROUPED``) has ``WHAT``,
``setup(quick) -> inputs`` (seeded, the same for both sides) and the timed ``run_kitsnet`` /
``run_peer(inputs)``; optionally ``GOAL`` (peer time / kitsnet time), ``THREADS`` (default all
cores), ``MAX_RUNS``, ``LIMIT_MB``, ``PEER`` (default nnU-Net v2.8.1), ``skip_reason()`` and
``peer_available()`` (why it / the peer cannot run here, else None), ``NEEDS_CUDA`` (skipped
without CUDA but with ``--quick``, which runs it tiny on the CPU), ``check(quick)`` (agreement
of the outputs, in its own child), ``extra(seconds, quick)`` (figures derived from kitsnet's
time), ``prepare_kitsnet`` / ``prepare_peer(inputs)`` (untimed work whose result the run gets,
then ``finish(prepared)``), ``figures(output)`` (reported per run as ``<side>_figures``; their
``seconds`` replace the call's, for work that times its own window; ``describe(figures)``
prints them) and ``TREE_MEMORY`` (work in several processes: ``peak_mb`` is the peak summed PSS
of the child and its descendants, sampled every 50 ms, also without file-backed pages, and
``inputs_mb`` that sum before the call; plus the tree's CPU seconds).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy
import torch

BENCHMARKS = ("preprocess", "export", "sliding_window", "augment", "evaluate", "memory")
BENCHMARKS += ("train_input", "cascade_roi", "gpu_train", "gpu_window")
BENCHMARKS += ("ensemble_storage",)
# benchmarks defined together: name -> "module:object" (benchmarks/bench_<module>.py)
GROUPED = {"gpu_train": "gpu:TRAIN", "gpu_window": "gpu:WINDOW"}
ROOT = Path(__file__).resolve().parents[1]
TREE_SAMPLE_S = 0.05
TREE_MEMORY_MEANS = (
    "process-tree PSS peak: child + all descendant processes, sampled every 50 ms by a nice-19 "
    "thread (*_memory_samples: how many samples it got); *_peak_anon_mb: the same without "
    "file-backed pages (memory-mapped cases); *_cpu_s: CPU seconds of that process tree during "
    "the timed call (median), cpu_ratio: peer / kitsnet"
)


def module(name: str) -> Any:
    """The module (or, for ``GROUPED`` names, the object in it) that defines benchmark ``name``."""
    file, _, attr = GROUPED.get(name, name).partition(":")
    found = importlib.import_module(f"benchmarks.bench_{file}")
    return getattr(found, attr) if attr else found


def thread_env(threads: int) -> dict[str, str]:
    """The same thread counts for every library on both sides."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KITSNET_THREADS")
    return {**os.environ, **dict.fromkeys(names, str(threads))}


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_mb(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB, from /proc."""
    return int(_proc_line("/proc/self/status", field + ":").split()[0]) / 1024


def _tree_cpu_s(root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) so far of ``root`` (default: this process) and of every
    process below it, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError, ValueError):  # exited meanwhile
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out, todo = {}, [root or os.getpid()]
    while todo:
        pid = todo.pop()
        out[pid] = cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return out


def _pss_kb(pid: int) -> tuple[int, int]:
    """Proportional set size of one process in KiB (VmRSS where smaps_rollup is missing), and
    the part of it not backed by files (``Pss_Anon`` + ``Pss_Shmem``; RssAnon + RssShmem)."""
    for name, total, parts in (
        ("smaps_rollup", "Pss", ("Pss_Anon", "Pss_Shmem")),
        ("status", "VmRSS", ("RssAnon", "RssShmem")),
    ):
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
            pairs = (ln.split(":", 1) for ln in lines if ":" in ln)
            fields = {k: int(v.split()[0]) for k, v in pairs if k == total or k in parts}
            if total in fields:
                return fields[total], sum(fields.get(k, 0) for k in parts)
    return 0, 0


def tree_pss_mb(root: int | None = None) -> tuple[float, float]:
    """Summed PSS of ``root`` (default: this process) and its descendants, in MiB, and the
    summed part of it not backed by files (anonymous and shared memory)."""
    sums = [_pss_kb(p) for p in _tree_cpu_s(root)]
    return sum(x for x, _ in sums) / 1024, sum(y for _, y in sums) / 1024


class TreeMemory:
    """Peaks of :func:`tree_pss_mb`, sampled in a background thread while the block runs, and
    the CPU seconds the process tree spent meanwhile (``cpu_s``: processes alive at the end,
    less the sampling thread's own time).

    Reading smaps_rollup walks the page tables of every mapping (milliseconds for a process
    with GBs of memory-mapped cases), so the thread runs at the lowest priority (nice 19): where
    the measured processes use every core it samples less often (``samples`` says how often)
    rather than slowing them down."""

    def __enter__(self) -> TreeMemory:
        self.peak, self.peak_anon = tree_pss_mb()
        self.samples, self._own_cpu, self._cpu0 = 1, 0.0, _tree_cpu_s()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        total, anon = tree_pss_mb()
        self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
        self.samples += 1

    def _loop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        while not self._stop.wait(TREE_SAMPLE_S):
            self._sample()
        self._own_cpu = time.thread_time()

    def __exit__(self, *exc: object) -> None:
        cpu1 = _tree_cpu_s()
        self._stop.set()
        self._thread.join()
        self.cpu_s = sum(c - self._cpu0.get(pid, 0.0) for pid, c in cpu1.items()) - self._own_cpu
        self._sample()


def _timed(mod: Any, fn: Any, inputs: Any) -> dict[str, Any]:
    """One timed call of ``fn(inputs)``: its seconds, peak and baseline memory (see the module
    docstring), and the module's ``figures`` of its output."""
    tree = TreeMemory() if getattr(mod, "TREE_MEMORY", False) else None
    base = tree_pss_mb()[0] if tree else rss_mb("VmRSS")
    reset_peak()
    with tree or contextlib.nullcontext():
        t0 = time.perf_counter()
        out = fn(inputs)
        seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "peak_mb": tree.peak if tree else rss_mb(), "inputs_mb": base}
    if hasattr(mod, "figures"):
        result["figures"] = mod.figures(out)
        result["seconds"] = result["figures"].get("seconds", seconds)
    if tree is not None:
        result.update(peak_anon_mb=tree.peak_anon, memory_samples=tree.samples, cpu_s=tree.cpu_s)
    return result


def child_measure(name: str, side: str, quick: bool) -> dict[str, Any]:
    """Run inside the child: set up (and prepare), reset the peak, time one call, report."""
    threads = int(os.environ.get("KITSNET_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    mod = module(name)
    if side == "check":
        return {"check": mod.check(quick)}
    inputs = mod.setup(quick)
    prepare = getattr(mod, f"prepare_{side}", None)
    if prepare is not None:
        inputs = prepare(inputs)
    result = _timed(mod, mod.run_kitsnet if side == "kitsnet" else mod.run_peer, inputs)
    if prepare is not None and hasattr(mod, "finish"):
        mod.finish(inputs)
    return {**result, "threads": threads}


def _kill_group(proc: subprocess.Popen) -> None:
    """End a child's whole session (its worker processes too), if anything of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def spawn(name: str, side: str, quick: bool, threads: int, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh child process in its own session; its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.child", name, side] + (["--quick"] if quick else [])
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    env = thread_env(threads)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **pipes)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        err += f"\n(killed: timed out after {timeout:.0f} s)"
    finally:  # also on SIGTERM of the parent; after an exit: its stragglers
        _kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({side}) failed with exit {proc.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def blank(name: str, **why: str) -> dict[str, Any]:
    """The entry of a benchmark that did not run: ``skipped`` or ``failed``, and why."""
    nothing = dict.fromkeys(("kitsnet_s", "peer_s", "ratio", "kitsnet_peak_mb", "peer_peak_mb"))
    return {"name": name, "what": module(name).WHAT, **why, "runs": 0, **nothing}


def skip_reason(mod: Any, quick: bool) -> str | None:
    """Why the benchmark cannot run here (its own ``skip_reason``, or no CUDA), else None."""
    if getattr(mod, "NEEDS_CUDA", False) and not quick and not torch.cuda.is_available():
        return "CUDA is not available to torch (--quick runs it tiny on the CPU)"
    return mod.skip_reason() if hasattr(mod, "skip_reason") else None


def _side(side: str, res: list[dict[str, Any]], tree: bool) -> dict[str, Any]:
    """One side's median time, spread, peak and baseline memory (and tree CPU, figures)."""
    seconds = [x["seconds"] for x in res]
    out = {
        f"{side}_s": statistics.median(seconds),
        f"{side}_s_spread": summarise(seconds),
        f"{side}_peak_mb": max(x["peak_mb"] for x in res),
        f"{side}_inputs_mb": res[0]["inputs_mb"],
    }
    if tree:
        out[f"{side}_peak_anon_mb"] = max(x["peak_anon_mb"] for x in res)
        out[f"{side}_memory_samples"] = [x["memory_samples"] for x in res]
        out[f"{side}_cpu_s"] = statistics.median(x["cpu_s"] for x in res)
    if "figures" in res[0]:
        out[f"{side}_figures"] = [x["figures"] for x in res]
    return out


def _measure(name: str, quick: bool, runs: int, timeout: float, log: Any) -> dict[str, Any]:
    """Alternate kitsnet and peer ``runs`` times each; medians, spreads, paired ratios."""
    mod = module(name)
    threads = int(getattr(mod, "THREADS", 0) or os.cpu_count() or 1)
    runs = min(runs, getattr(mod, "MAX_RUNS", runs))
    why_not = mod.peer_available() if hasattr(mod, "peer_available") else None
    has_peer = hasattr(mod, "run_peer") and why_not is None
    tree = getattr(mod, "TREE_MEMORY", False)
    done: dict[str, list[dict[str, Any]]] = {"kitsnet": [], "peer": []}
    for r in range(runs):  # kitsnet first on even rounds, the peer on odd ones
        for side in ["kitsnet", "peer"][:: 1 - 2 * (r % 2)]:
            if side == "peer" and not has_peer:
                continue
            try:
                res = spawn(name, side, quick, threads, timeout)
            except RuntimeError as exc:  # a failing peer costs its own side only
                if side == "kitsnet":
                    raise
                why_not, has_peer, done["peer"] = f"FAILED: {exc}"[-3000:], False, []
                log(f"  {name}: peer {why_not}")
                continue
            done[side].append(res)
            m = f"{res['seconds']:9.3f} s peak {res['peak_mb']:8.0f} MiB"
            log(f"  {name:15s} run {r + 1}/{runs} {side:8s} {m}")
    k_runs, p_runs = done["kitsnet"], done["peer"]
    entry: dict[str, Any] = {"name": name, "what": mod.WHAT, "threads": threads, "runs": runs}
    entry["peer"] = getattr(mod, "PEER", "nnU-Net v2.8.1") if has_peer else None
    entry["goal_ratio"] = getattr(mod, "GOAL", None)
    entry.update(_side("kitsnet", k_runs, tree), peer_s=None, peer_peak_mb=None, ratio=None)
    if p_runs:  # the peer's side and the ratios of its medians to kitsnet's
        k_s, p_s = [x["seconds"] for x in k_runs], [x["seconds"] for x in p_runs]
        entry.update(_side("peer", p_runs, tree))
        entry["ratio"] = entry["peer_s"] / entry["kitsnet_s"]
        entry["ratio_paired_spread"] = summarise([p / k for p, k in zip(p_s, k_s, strict=True)])
        entry["memory_ratio"] = entry["peer_peak_mb"] / entry["kitsnet_peak_mb"]
        entry["goal_met"] = entry["ratio"] >= entry["goal_ratio"] if entry["goal_ratio"] else None
        if tree:
            entry["cpu_ratio"] = entry["peer_cpu_s"] / entry["kitsnet_cpu_s"]
    else:
        entry["peer_missing"] = why_not or "no peer for this benchmark"
        entry["peer_failed"] = str(why_not).startswith("FAILED")
    if tree:
        entry["peak_mb_means"] = TREE_MEMORY_MEANS
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


def run_benchmark(name: str, quick: bool, runs: int, timeout: float, log=print) -> dict[str, Any]:
    """One benchmark's entry: measured, or skipped / failed with the reason."""
    skip = skip_reason(module(name), quick)
    if skip:
        log(f"  {name}: skipped: {skip}")
        return blank(name, skipped=skip)
    try:
        return _measure(name, quick, runs, timeout, log)
    except RuntimeError as exc:  # a failed or timed-out child: this row only
        log(f"  {name}: FAILED: {exc}")
        return blank(name, failed=str(exc)[-3000:])


def _proc_line(path: str, prefix: str) -> str | None:
    """The rest of the first line of a /proc file that starts with ``prefix``."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, Any]:
    """What a result depends on: the machine, its load, the library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    mem = _proc_line("/proc/meminfo", "MemTotal:")
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": _proc_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem.split()[0]) / 1024**2, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_version": torch.version.cuda,
        "load_average_before": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nnunetv2": None,
    }
    with contextlib.suppress(PackageNotFoundError):
        info["nnunetv2"] = version("nnunetv2")
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
        if e.get("skipped") or e.get("failed"):
            why = f"skipped: {e['skipped']}" if e.get("skipped") else "FAILED (see the JSON)"
            lines.append(f"{e['name']:15s} {why}")
            continue
        sp = e.get("ratio_paired_spread")
        spread = f"{sp['min']:.2f}-{sp['max']:.2f}" if sp else "-"
        goal = e.get("goal_ratio")
        mark = "" if e.get("goal_met") is None else (" ok" if e["goal_met"] else " LOW")
        mark += " PEER FAILED" if e.get("peer_failed") else ""
        lines.append(
            f"{e['name']:15s} {fmt(e['kitsnet_s'], '10.3f')} {fmt(e['peer_s'], '10.3f')} "
            f"{fmt(e['ratio'], '6.2f')} {spread:>12s} {fmt(goal, '5.1f')} "
            f"{fmt(e['kitsnet_peak_mb'], '11.0f')} {fmt(e['peer_peak_mb'], '9.0f')}  "
            f"{e['runs']}{mark}"
        )
    for e in entries:  # the figures of benchmarks that report them, one line per run
        for side in ("kitsnet", "peer"):
            for f in e.get(f"{side}_figures", []):
                lines.append(f"{e['name']} {side}: {module(e['name']).describe(f)}")
    return "\n".join(lines)
