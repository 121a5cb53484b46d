"""What ``kitsnet fetch`` tells its user: the live progress line, retry notes, the summary.

Apart from :mod:`kitsnet.data.fetch` because it changes for other reasons (wording, terminal
handling) than the transfer logic does.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: error messages and summaries stay one line."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def case_ranges(cases: Iterable[str]) -> str:
    """``["case_00000", "case_00001"]`` -> ``"0-1"``."""
    return ranges(int(c.removeprefix("case_")) for c in cases)


@dataclass
class FetchSummary:
    """What one :func:`fetch` run did, case by case (the CLI prints :meth:`report`)."""

    dataset: str
    out: Path
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # case -> what was wrong before
    bytes_downloaded: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, case: str, status: str, detail: str) -> None:
        if status == "downloaded":
            self.downloaded.append(case)
            if detail:
                self.replaced[case] = detail
        elif status == "skipped":
            self.skipped.append(case)
        else:
            self.failed[case] = detail

    def report(self) -> str:
        lines = [
            f"{self.dataset} imaging in {self.out}: {len(self.downloaded)} downloaded "
            f"({_human(self.bytes_downloaded)} in {self.seconds:.0f} s), "
            f"{len(self.skipped)} already complete, {len(self.failed)} failed"
        ]
        if self.downloaded:
            lines.append(f"  downloaded: cases {case_ranges(self.downloaded)}")
        for case, why in sorted(self.replaced.items()):
            lines.append(f"  replaced {case}: {why}")
        if self.skipped:
            lines.append(f"  skipped (complete): cases {case_ranges(self.skipped)}")
        for case, why in sorted(self.failed.items()):
            lines.append(f"  FAILED {case}: {why}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Bytes done / total and an ETA on one ``\\r`` line (TTY), else one line per case.

    Sizes are learnt from each response, so cases not started yet are estimated at the mean
    size seen so far (shown with ``~``): no HEAD round trip per case just for the display.
    """

    def __init__(self, n_cases: int, enabled: bool) -> None:
        self.stream = sys.stderr
        self.live = enabled and self.stream.isatty()
        self.n_cases, self.finished, self.finished_bytes, self.moved = n_cases, 0, 0, 0
        self.size: dict[str, int] = {}  # active cases whose size the server told
        self.done: dict[str, int] = {}  # bytes in each active case's .part
        self.seen: list[int] = []
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def begin(self, case: str, offset: int, total: int | None) -> None:
        with self.lock:
            self.done[case] = offset
            if total is not None and case not in self.size:
                self.seen.append(total)
            if total is not None:
                self.size[case] = total

    def advance(self, case: str, n: int) -> None:
        with self.lock:
            self.done[case] = self.done.get(case, 0) + n
            self.moved += n
            if self.live and time.monotonic() - self.last > 0.2:
                self._draw()

    def finish(self, case: str, line: str) -> None:
        with self.lock:
            self.finished += 1
            self.finished_bytes += self.done.pop(case, 0)
            self.size.pop(case, None)
            prefix = "\r\033[K" if self.live else ""
            print(f"{prefix}[{self.finished}/{self.n_cases}] {case}: {line}", file=self.stream)
            if self.live:
                self._draw()

    def note(self, line: str) -> None:
        """A line between the case results (a retry and its wait): a long backoff is never
        silent.  Printed whether or not the live line is on, like the per-case lines."""
        with self.lock:
            prefix = "\r\033[K" if self.live else ""
            print(f"{prefix}{line}", file=self.stream, flush=True)
            if self.live:
                self._draw()

    def close(self) -> None:
        if self.live:
            print("\r\033[K", end="", file=self.stream, flush=True)

    def _draw(self) -> None:
        """Called with the lock held."""
        self.last = now = time.monotonic()
        done = self.finished_bytes + sum(self.done.values())
        unsized = self.n_cases - self.finished - len(self.size)
        mean = sum(self.seen) / len(self.seen) if self.seen else 0
        total = self.finished_bytes + sum(self.size.values()) + mean * unsized
        rate = self.moved / max(now - self.start, 1e-6)
        left = int(max(total - done, 0) / rate) if rate > 0 and total else -1
        eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 0 else "?"
        self.stream.write(
            f"\r\033[K{self.finished}/{self.n_cases} cases, {_human(done)} of "
            f"{'~' if unsized else ''}{_human(total)}, {_human(rate)}/s, ETA {eta}"
        )
        self.stream.flush()
