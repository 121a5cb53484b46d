"""Download the KiTS CT scans from where the organisers serve them now (Hugging Face).

The label maps come from a git clone of the kits21 / kits23 repository, but the CT volumes are
too large for git: the organisers moved them to the Hugging Face dataset
``neheller/KiTS-Challenge-Imaging`` (``images/case_XXXXX.nii.gz``).  :func:`fetch` puts each
one at ``OUT/case_XXXXX/imaging.nii.gz``, beside the labels of the clone's data folder.

Hundreds of files of a few hundred MB each over a flaky link: a transfer is streamed to a hidden
``.imaging.nii.gz.part`` beside the target and resumed with an HTTP ``Range`` request after a
cut; timeouts, cut connections, 5xx and 429 are retried with exponential backoff (each retry
announced on stderr); a host that cannot be connected to at all (name not resolved, connection
refused) and has not answered before gets two quick re-checks, then the whole run stops with
one message naming the host and the proxy settings (:mod:`kitsnet.data.fetch_http`); and only a
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
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsnet.core.io import KitsnetError
from kitsnet.data.fetch_http import (
    Cancelled,
    HostLog,
    Permanent,
    Transient,
    Unreachable,
    Whole,
    build_opener,
    open_range,
    total_from_content_range,
)
from kitsnet.data.fetch_progress import FetchSummary, Progress, ranges

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
QUICK_RETRIES = 2  # re-checks of a host that never answered before it is judged unreachable


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
            f"--cases: {dataset} has no case {ranges(unknown)} (its cases are {ranges(known)})"
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
class _Options:
    """What the workers of one run share: the settings, the display and the stop signal."""

    opener: urllib.request.OpenerDirector
    hosts: HostLog
    retries: int
    timeout: float
    backoff: float
    progress: Progress
    cancel: threading.Event = field(default_factory=threading.Event)
    verdict: str | None = None  # why the run stopped early (a host unreachable); first one wins
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop_run(self, exc: Unreachable) -> None:
        """Judge ``exc.host`` unreachable: every worker stops at its next wait or chunk, and
        no further case starts, since each would only fail the same way."""
        with self.lock:
            if self.verdict is None:
                self.verdict = exc.verdict()
        self.cancel.set()


def _attempt(case: str, url: str, part: Path, opts: _Options) -> int | None:
    """One GET into ``part``, resuming from its size; returns the server's full size.

    The case folder is made only once a response is in hand, so a run that reaches nothing
    leaves no empty ``case_XXXXX/`` behind.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = open_range(opts.opener, opts.hosts, url, offset, opts.timeout)
    except Whole:
        return offset
    except Transient as exc:
        if exc.restart:
            part.unlink(missing_ok=True)
        raise
    with resp:
        if resp.status == 206:
            start, total = total_from_content_range(resp.headers.get("Content-Range"))
            if start != offset or total is None:
                part.unlink(missing_ok=True)
                bad = resp.headers.get("Content-Range")
                raise Transient(f"unusable Content-Range {bad!r}", 0, True)
            mode = "ab"
        else:  # 200: the server sent the whole file (no or ignored Range): start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            offset, mode = 0, "wb"
        opts.progress.begin(case, offset, total)
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, mode) as fh:
            while True:
                if opts.cancel.is_set():
                    raise Cancelled()
                try:
                    chunk = resp.read1(CHUNK)  # what has arrived: a timeout loses none
                except (OSError, http.client.HTTPException) as exc:
                    raise Transient(f"transfer interrupted: {exc!r}") from exc
                if not chunk:
                    break
                fh.write(chunk)
                opts.progress.advance(case, len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise Transient(f"connection closed after {got} of {total} bytes")
    return total


def _never_answered(exc: Transient, opts: _Options) -> bool:
    """No connection to a host that has not answered once this run: likely down for good."""
    return isinstance(exc, Unreachable) and not opts.hosts.answered(exc.host)


def _wait_to_retry(case: str, last: Transient, attempt: int, opts: _Options) -> None:
    """Sleep before retry number ``attempt``, saying so on stderr, so a long backoff is never
    silent.  The quick re-checks of a host that never answered stay quiet and short: if they
    fail too, the one message of :meth:`_Options.stop_run` says it all."""
    quick = _never_answered(last, opts)
    if quick:
        delay = opts.backoff / 4 * 2 ** (attempt - 1)  # 0.5 s, 1 s with the default backoff
    elif last.wait is not None:
        delay = last.wait
    else:  # the jitter spreads out parallel workers hit by one 503
        delay = opts.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
    delay = min(delay, MAX_DELAY)
    if not quick:
        when = f"in {delay:.0f} s" if delay >= 1 else f"in {delay:.1f} s" if delay else "now"
        opts.progress.note(f"{case}: {last}, retry {attempt}/{opts.retries} {when}")
    if opts.cancel.wait(delay):
        raise Cancelled()


def _download(case: str, url: str, target: Path, opts: _Options) -> None:
    """Retry :func:`_attempt` with exponential backoff until a verified file is in place.

    A host that cannot be connected to and has not answered this run gets QUICK_RETRIES short
    re-checks, then the run stops: 300 cases x 6 attempts with backoff took 2.5 hours to say
    the same thing.  One that answered before (a restart?) gets the full backoff first.
    """
    part = target.with_name(f".{target.name}.part")
    last: Transient | None = None
    for attempt in range(opts.retries + 1):
        if last is not None:
            _wait_to_retry(case, last, attempt, opts)
        elif opts.cancel.is_set():
            raise Cancelled()
        try:
            total = _attempt(case, url, part, opts)
            verify_image(part, total)
        except Transient as exc:
            last = exc
        except KitsnetError as exc:  # transferred but corrupt: the .part is useless
            part.unlink(missing_ok=True)
            last = Transient(f"corrupt transfer: {exc}")
        else:
            os.replace(part, target)
            return
        if _never_answered(last, opts) and attempt >= min(QUICK_RETRIES, opts.retries):
            break
    if isinstance(last, Unreachable):
        opts.stop_run(last)
        raise Cancelled()
    raise Permanent(f"gave up after {opts.retries + 1} attempts; last: {last}")


def _remove_if_empty(folder: Path) -> None:
    """``rmdir``: gone only when empty, so a .part to resume or the user's files keep it."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _fetch_case(case: str, url: str, target: Path, opts: _Options) -> tuple[str, str]:
    """Skip a verified target, else (re)download it; returns (status, detail) for the summary.

    ``stopped``: the run is stopping (Ctrl-C, host unreachable), the case neither done nor
    failed.  A case folder left empty by anything but success is removed.
    """
    if opts.cancel.is_set():
        return "stopped", ""
    before = ""
    if target.exists():
        try:
            verify_image(target)
            return "skipped", "already complete"
        except KitsnetError as exc:
            before = str(exc)
            target.unlink()  # a broken target must not stay where the pipeline reads it
    status, detail = "failed", ""
    try:
        _download(case, url, target, opts)
        status, detail = "downloaded", before
    except Cancelled:
        status = "stopped"
    except Permanent as exc:
        if exc.gone:
            target.with_name(f".{target.name}.part").unlink(missing_ok=True)
        detail = str(exc)
    except OSError as exc:  # disk full, permissions: the next case would fail the same way
        detail = f"cannot write {target}: {exc}"
    finally:
        if status != "downloaded":
            _remove_if_empty(target.parent)
    return status, detail


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, deepest first: the folders a run may
    create, and removes again if it leaves them empty."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


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
    """Download ``dataset``'s CT scans to ``out/case_XXXXX/imaging.nii.gz``.

    ``cases`` is a SPEC (``"0-9,42"``), a list of case ids, or ``None`` for all of them; each
    comes from ``{base_url}/images/case_XXXXX.nii.gz``.  Failures are collected in the summary
    (``summary.failed``: case -> why) so one missing case does not stop the other 488.  Only a
    host that cannot be reached at all stops the run: :class:`KitsnetError`, naming it.
    """
    if isinstance(cases, str) or cases is None:
        ids = parse_cases(cases, dataset)
    else:  # a list of ids: validated the same way, and an empty list means none, not all
        listed = list(cases)
        ids = parse_cases(",".join(listed), dataset) if listed else []
    out = Path(out)
    made = _missing_folders(out)
    summary = FetchSummary(dataset, out)
    bar = Progress(len(ids), progress)
    hosts = HostLog()
    opts = _Options(build_opener(hosts), hosts, max(0, retries), timeout, backoff, bar)
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
            if status != "stopped":
                summary.add(case, status, detail)
                if status == "downloaded" and detail:
                    detail = f"replaced a broken file ({detail})"
                bar.finish(case, f"{status}: {detail}" if detail else status)
            if opts.verdict is not None:
                break
    except KeyboardInterrupt:
        opts.cancel.set()  # workers stop at the next chunk; their .part files resume later
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        for folder in made:
            _remove_if_empty(folder)
    summary.bytes_downloaded = bar.moved
    summary.seconds = time.monotonic() - bar.start
    if opts.verdict is not None:
        done = len(summary.downloaded) + len(summary.skipped)
        raise KitsnetError(opts.verdict + (f" ({done} of {len(ids)} cases done)" if done else ""))
    return summary
