"""Download the KiTS CT scans from where the organisers serve them now (Hugging Face).

The label maps come from a git clone of the kits21 / kits23 repository, but the CT volumes are
too large for git: the organisers moved them to the Hugging Face dataset
``neheller/KiTS-Challenge-Imaging`` (``images/case_XXXXX.nii.gz``).  :func:`fetch` puts each
one at ``OUT/case_XXXXX/imaging.nii.gz``, beside the labels of the clone's data folder.

Hundreds of files of a few hundred MB each over a flaky link: a transfer is streamed to a hidden
``.imaging.nii.gz.part`` beside the target and resumed with an HTTP ``Range`` request after a
cut; timeouts, connection errors, 5xx and 429 are retried with exponential backoff; and only a
file whose size matches the server's, whose gzip stream checks out (CRC and length, read to the
end) and whose NIfTI header fits its payload is renamed onto the target.  So a target is always
complete, and a second run transfers only what is missing or broken.  Proxies are taken from
the usual ``HTTPS_PROXY`` / ``https_proxy`` / ``NO_PROXY`` environment variables (urllib).
"""

from __future__ import annotations

import gzip
import http.client
import io
import os
import random
import re
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .io import KitsnetError

__all__ = ["DEFAULT_BASE_URL", "FetchSummary", "fetch", "parse_cases", "verify_image"]

DEFAULT_BASE_URL = "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main"

# KiTS21 released cases 0-299 (kits21 repo, data/case_00000 .. case_00299).  KiTS23's training
# set (dataset v0.1.3) is 489 cases: 0-299 and 400-588 (TRAINING_CASE_NUMBERS of the kits23
# package; an early version of its kits23/__init__.py read range(400, 595), the release has 489).
KITS21_CASES = tuple(range(300))
KITS23_CASES = tuple(range(300)) + tuple(range(400, 589))
DATASET_CASES: dict[str, tuple[int, ...]] = {"kits21": KITS21_CASES, "kits23": KITS23_CASES}

TARGET_NAME = "imaging.nii.gz"
CHUNK = 1 << 20
MAX_DELAY = 60.0  # seconds: backoff and Retry-After never wait longer than this
_USER_AGENT = "kitsnet-fetch/0.1 (python urllib)"


class _Transient(Exception):
    """A failure worth retrying (network, 5xx, 429, cut transfer, corrupt transfer)."""

    def __init__(self, message: str, wait: float | None = None, restart: bool = False) -> None:
        super().__init__(message)
        self.wait = wait  # seconds the server asked for (Retry-After); None: exponential backoff
        self.restart = restart  # the .part cannot be resumed: drop it, retry at once from zero


class _Permanent(Exception):
    """A failure retrying cannot fix (404, 403, bad URL, certificate)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone  # the server has no such file: a .part of it is no use either


class _Whole(Exception):
    """The server says the ``.part`` already holds every byte (416 at offset == size)."""


class _Cancelled(Exception):
    """The user interrupted the run; partial files stay for the next one to resume."""


def _ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: error messages and summaries stay one line."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _case_ranges(cases: Iterable[str]) -> str:
    return _ranges(int(c.removeprefix("case_")) for c in cases)


def parse_cases(spec: str | None, dataset: str) -> list[str]:
    """Turn ``"0-9,42"`` (or ``case_00042``) into sorted case ids of ``dataset``.

    ``None`` or an empty spec means every case.  Ids the dataset does not have are refused up
    front, all of them named, rather than surfacing later as a row of 404s.
    """
    if dataset not in DATASET_CASES:
        raise KitsnetError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_CASES)}")
    known = DATASET_CASES[dataset]
    if spec is None or not spec.strip():
        return [f"case_{n:05d}" for n in known]
    wanted: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        m = re.fullmatch(r"(?:case_)?(\d+)(?:\s*-\s*(?:case_)?(\d+))?", item)
        if not m:
            raise KitsnetError(f"--cases: cannot read {item!r}; expected e.g. 0-9,42")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise KitsnetError(f"--cases: range {item!r} runs backwards")
        wanted.update(range(lo, hi + 1))
    unknown = wanted.difference(known)
    if unknown:
        raise KitsnetError(
            f"--cases: {dataset} has no case {_ranges(unknown)} (its cases are {_ranges(known)})"
        )
    return [f"case_{n:05d}" for n in sorted(wanted)]


def _nifti_header(head: bytes) -> nib.Nifti1Header:
    """Parse a NIfTI-1/2 header from the first decompressed bytes (no voxel data read)."""
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4]) if len(head) >= 4 else (0,)
        klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
        if klass is not None and len(head) >= size:
            hdr = klass.from_fileobj(io.BytesIO(head[:size]), check=True)
            if bytes(hdr["magic"]).rstrip(b"\0") not in (b"n+1", b"n+2"):
                raise ValueError(f"magic {bytes(hdr['magic'])!r} is not a single-file NIfTI")
            return hdr
    raise ValueError("no NIfTI header at the start of the decompressed data")


def verify_image(path: str | os.PathLike[str], expected_size: int | None = None) -> None:
    """Raise :class:`KitsnetError` unless ``path`` is a whole, readable ``.nii.gz``.

    The size is compared with the server's when known; the gzip stream is read to its end,
    because only there do the CRC and length trailer catch a cut or corrupted transfer (nibabel
    stops once it has the voxels); and the NIfTI header must parse and fit the payload.  Works
    on any file name, so a ``.part`` is checked before it is renamed.
    """
    path = Path(path)
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise KitsnetError(f"{path.name} is {size} bytes, the server's file {expected_size}")
    try:
        with gzip.open(path, "rb") as stream:
            head = stream.read(540)
            total = len(head)
            while chunk := stream.read(CHUNK):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise KitsnetError(f"{path.name} is not a valid gzip file: {exc}") from exc
    try:
        hdr = _nifti_header(head)
        shape = hdr.get_data_shape()
        need = int(hdr["vox_offset"]) + int(np.prod(shape)) * hdr.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises several types for a bad header
        raise KitsnetError(f"{path.name} has no readable NIfTI header: {exc}") from exc
    if total < need:
        raise KitsnetError(f"{path.name} holds {total} bytes of NIfTI, its header needs {need}")


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
            lines.append(f"  downloaded: cases {_case_ranges(self.downloaded)}")
        for case, why in sorted(self.replaced.items()):
            lines.append(f"  replaced {case}: {why}")
        if self.skipped:
            lines.append(f"  skipped (complete): cases {_case_ranges(self.skipped)}")
        for case, why in sorted(self.failed.items()):
            lines.append(f"  FAILED {case}: {why}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Progress:
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


@dataclass
class _Options:
    opener: urllib.request.OpenerDirector
    retries: int
    timeout: float
    backoff: float
    progress: _Progress
    cancel: threading.Event


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 100); ``bytes */100`` -> (None, 100); junk -> (None, None)."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+)", (value or "").strip())
    return (int(m[1]) if m and m[1] else None), (int(m[2]) if m else None)


def _http_error(exc: urllib.error.HTTPError, url: str) -> Exception:
    """Classify an HTTP error status: 429 and 5xx are retried, other 4xx are final."""
    exc.close()
    what = f"HTTP {exc.code} {exc.reason} for {url}"
    if exc.code == 429 or exc.code >= 500:
        after = (exc.headers.get("Retry-After") or "").strip()
        return _Transient(what, wait=float(after) if after.isdigit() else None)
    return _Permanent(what, gone=400 <= exc.code < 500)


def _open(url: str, offset: int, opts: _Options) -> http.client.HTTPResponse:
    """GET ``url`` from byte ``offset``; map every failure to transient or permanent."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return opts.opener.open(urllib.request.Request(url, headers=headers), timeout=opts.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is already whole, or longer than the file
            exc.close()
            total = _total_from_content_range(exc.headers.get("Content-Range"))[1]
            if total == offset:
                raise _Whole() from None
            raise _Transient(f"HTTP 416 at byte {offset} (file is {total})", 0, True) from exc
        raise _http_error(exc, url) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise _Permanent(f"TLS certificate not trusted for {url}: {exc.reason}") from exc
        raise _Transient(f"cannot connect for {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"connection failed for {url}: {exc!r}") from exc
    except ValueError as exc:
        raise _Permanent(f"bad URL {url}: {exc}") from exc


def _attempt(case: str, url: str, part: Path, opts: _Options) -> int | None:
    """One GET into ``part``, resuming from its size; returns the server's full size."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, opts)
    except _Whole:
        return offset
    except _Transient as exc:
        if exc.restart:
            part.unlink(missing_ok=True)
        raise
    with resp:
        if resp.status == 206:
            start, total = _total_from_content_range(resp.headers.get("Content-Range"))
            if start != offset or total is None:
                part.unlink(missing_ok=True)
                bad = resp.headers.get("Content-Range")
                raise _Transient(f"unusable Content-Range {bad!r}", 0, True)
            mode = "ab"
        else:  # 200: the server sent the whole file (no or ignored Range): start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            offset, mode = 0, "wb"
        opts.progress.begin(case, offset, total)
        with open(part, mode) as fh:
            while True:
                if opts.cancel.is_set():
                    raise _Cancelled()
                try:
                    chunk = resp.read1(CHUNK)  # what has arrived: a timeout loses none
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(f"transfer interrupted: {exc!r}") from exc
                if not chunk:
                    break
                fh.write(chunk)
                opts.progress.advance(case, len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Transient(f"connection closed after {got} of {total} bytes")
    return total


def _download(case: str, url: str, target: Path, opts: _Options) -> None:
    """Retry :func:`_attempt` with exponential backoff until a verified file is in place."""
    part = target.with_name(f".{target.name}.part")
    last: _Transient | None = None
    delay = 0.0
    for attempt in range(opts.retries + 1):
        if delay and opts.cancel.wait(min(delay, MAX_DELAY)):
            raise _Cancelled()
        try:
            total = _attempt(case, url, part, opts)
            verify_image(part, total)
        except _Transient as exc:
            last = exc
        except KitsnetError as exc:  # transferred but corrupt: the .part is useless
            part.unlink(missing_ok=True)
            last = _Transient(f"corrupt transfer: {exc}")
        else:
            os.replace(part, target)
            return
        jitter = 1 + 0.25 * random.random()  # parallel workers hit by one 503 spread out
        delay = last.wait if last.wait is not None else opts.backoff * 2**attempt * jitter
    raise _Permanent(f"gave up after {opts.retries + 1} attempts; last: {last}")


def _fetch_case(case: str, url: str, target: Path, opts: _Options) -> tuple[str, str]:
    """Skip a verified target, else (re)download it; returns (status, detail) for the summary."""
    before = ""
    if target.exists():
        try:
            verify_image(target)
            return "skipped", "already complete"
        except KitsnetError as exc:
            before = str(exc)
            target.unlink()  # a broken target must not stay where the pipeline reads it
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(case, url, target, opts)
    except _Permanent as exc:
        if exc.gone:
            target.with_name(f".{target.name}.part").unlink(missing_ok=True)
        return "failed", str(exc)
    except OSError as exc:  # disk full, permissions: the next case would fail the same way
        return "failed", f"cannot write {target}: {exc}"
    return "downloaded", before


def fetch(
    dataset: str,
    out: str | os.PathLike[str],
    cases: str | Iterable[str] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    jobs: int = 4,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float = 2.0,
) -> FetchSummary:
    """Download ``dataset``'s CT scans to ``out/case_XXXXX/imaging.nii.gz``; never raises per case.

    ``cases`` is a SPEC (``"0-9,42"``), a list of case ids, or ``None`` for all of them; each
    comes from ``{base_url}/images/case_XXXXX.nii.gz``.  Failures are collected in the summary
    (``summary.failed``: case -> why) so one missing case does not stop the other 488.
    """
    if isinstance(cases, str) or cases is None:
        ids = parse_cases(cases, dataset)
    else:  # a list of ids: validated the same way, and an empty list means none, not all
        listed = list(cases)
        ids = parse_cases(",".join(listed), dataset) if listed else []
    out = Path(out)
    summary = FetchSummary(dataset, out)
    bar = _Progress(len(ids), progress)
    opts = _Options(
        urllib.request.build_opener(urllib.request.ProxyHandler()),  # env proxies, NO_PROXY
        max(0, retries),
        timeout,
        backoff,
        bar,
        threading.Event(),
    )
    base = base_url.rstrip("/")
    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="kitsnet-fetch")
    try:
        futures = {
            pool.submit(_fetch_case, c, f"{base}/images/{c}.nii.gz", out / c / TARGET_NAME, opts): c
            for c in ids
        }
        for future in as_completed(futures):
            case = futures[future]
            try:
                status, detail = future.result()
            except Exception as exc:  # a bug for one case must not lose the others' summary
                status, detail = "failed", f"unexpected error: {exc!r}"
            summary.add(case, status, detail)
            if status == "downloaded" and detail:
                detail = f"replaced a broken file ({detail})"
            bar.finish(case, f"{status}: {detail}" if detail else status)
    except KeyboardInterrupt:
        opts.cancel.set()  # workers stop at the next chunk; their .part files resume later
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary.bytes_downloaded = bar.moved
    summary.seconds = time.monotonic() - bar.start
    return summary
