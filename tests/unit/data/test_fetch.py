"""`kitsnet fetch` against a local stand-in for the Hugging Face dataset, with injected faults."""

from __future__ import annotations

import gzip
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsnet.cli import main
from kitsnet.core.io import KitsnetError
from kitsnet.data.fetch import fetch, parse_cases, verify_image
from kitsnet.data.fetch_http import PROXY_VARIABLES

FAST = {"backoff": 0.01, "timeout": 5.0, "progress": False}


def tiny_nifti_gz(seed: int) -> bytes:
    """A real, small CT-like .nii.gz (random noise so gzip cannot shrink it to nothing)."""
    rng = np.random.default_rng(seed)
    img = nib.Nifti1Image(rng.integers(-1024, 2000, (6, 40, 40), dtype=np.int16), np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0)


class FakeHub:
    """Serves ``/images/case_XXXXX.nii.gz`` with Range support, a request log and faults.

    ``faults[path]`` is a queue consumed one per GET: ``"cut"`` (half the body, then close),
    ``"stall"`` (half the body, then silence), ``"corrupt"`` (one byte flipped, same length),
    ``"full"`` (ignore Range, answer 200 with the whole file), ``"noise"`` (200 with an HTML
    body), an absolute URL (302 to it), or an int status (503, 429...).  ``/redirect/...``
    answers 302 to ``/...``.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.faults: dict[str, list[str | int]] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.proxied: list[str] = []  # absolute request targets: we were asked as a proxy
        self.lock = threading.Lock()

    def gets(self, path: str | None = None) -> list[tuple[str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET" and (path is None or e[1] == path)]

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        rng = h.headers.get("Range")
        path = urllib.parse.urlsplit(h.path).path
        with self.lock:
            self.log.append((h.command, path, rng))
            if path != h.path:
                self.proxied.append(h.path)
            fault = self.faults[path].pop(0) if self.faults.get(path) else None
        if path.startswith("/redirect/"):  # like HF's resolve/ URLs, which send to a CDN
            return self.reply(h, 302, b"", {"Location": path.removeprefix("/redirect")})
        if isinstance(fault, str) and fault.startswith("http"):  # to a CDN elsewhere
            return self.reply(h, 302, b"", {"Location": fault})
        data = self.files.get(path)
        if isinstance(fault, int):
            return self.reply(h, fault, b"busy", {"Retry-After": "0"})
        if data is None:
            return self.reply(h, 404, b"Entry not found")
        if fault == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        if fault == "noise":
            return self.reply(h, 200, b"<html>not a NIfTI</html>")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and fault != "full" else 0
        if start >= len(data) and rng:
            return self.reply(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        status, extra = 200, {}
        if rng and fault != "full":
            status = 206
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        payload = data[start:]
        if fault in ("cut", "stall"):
            h.close_connection = True
            self.reply(h, status, payload[: len(payload) // 2], extra, length=len(payload))
            if fault == "stall":
                time.sleep(1.0)
            return None
        return self.reply(h, status, payload if body else b"", extra, length=len(payload))

    @staticmethod
    def reply(h, status, payload, headers=None, length=None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload) if length is None else length))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
            h.wfile.flush()


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub with cases 0-5 of KiTS21 on 127.0.0.1; yields (hub, base_url)."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    files = {f"/images/case_{n:05d}.nii.gz": tiny_nifti_gz(n) for n in range(6)}
    fake = FakeHub(files)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            fake.handle(self, body=True)

        def do_HEAD(self):  # noqa: N802
            fake.handle(self, body=False)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def image(out: Path, n: int) -> Path:
    return out / f"case_{n:05d}" / "imaging.nii.gz"


def served(fake: FakeHub, n: int) -> bytes:
    return fake.files[f"/images/case_{n:05d}.nii.gz"]


def test_clean_fetch_writes_loadable_byte_identical_images(hub, tmp_path):
    fake, url = hub
    summary = fetch("kits21", tmp_path, "0-2", base_url=url, jobs=3, **FAST)
    assert summary.ok and sorted(summary.downloaded) == [f"case_{n:05d}" for n in range(3)]
    for n in range(3):
        assert image(tmp_path, n).read_bytes() == served(fake, n)
        assert nib.load(image(tmp_path, n)).shape == (6, 40, 40)
    assert not list(tmp_path.rglob(".*.part"))
    assert summary.bytes_downloaded == sum(len(served(fake, n)) for n in range(3))


def test_cut_transfer_is_resumed_with_a_range_request(hub, tmp_path):
    fake, url = hub
    path = "/images/case_00001.nii.gz"
    fake.faults[path] = ["cut"]
    summary = fetch("kits21", tmp_path, "1", base_url=url, **FAST)
    assert summary.downloaded == ["case_00001"]
    half = len(served(fake, 1)) // 2
    assert [r for _, _, r in fake.gets(path)] == [None, f"bytes={half}-"]
    assert image(tmp_path, 1).read_bytes() == served(fake, 1)


def test_cut_transfer_leaves_only_a_part_that_the_next_run_resumes(hub, tmp_path):
    fake, url = hub
    path = "/images/case_00002.nii.gz"
    fake.faults[path] = ["cut"]
    first = fetch("kits21", tmp_path, "2", base_url=url, retries=0, **FAST)
    assert "case_00002" in first.failed and "closed after" in first.failed["case_00002"]
    assert not image(tmp_path, 2).exists()  # no half-written target, ever
    part = image(tmp_path, 2).with_name(".imaging.nii.gz.part")
    assert part.stat().st_size == len(served(fake, 2)) // 2

    second = fetch("kits21", tmp_path, "2", base_url=url, retries=0, **FAST)
    assert second.downloaded == ["case_00002"]
    assert [r for _, _, r in fake.gets(path)] == [None, f"bytes={len(served(fake, 2)) // 2}-"]
    assert image(tmp_path, 2).read_bytes() == served(fake, 2) and not part.exists()


def test_stalled_transfer_times_out_and_resumes(hub, tmp_path):
    fake, url = hub
    path = "/images/case_00003.nii.gz"
    fake.faults[path] = ["stall"]
    summary = fetch("kits21", tmp_path, "3", base_url=url, **{**FAST, "timeout": 0.3})
    assert summary.ok
    assert fake.gets(path)[-1][2] == f"bytes={len(served(fake, 3)) // 2}-"
    assert image(tmp_path, 3).read_bytes() == served(fake, 3)


def test_range_request_survives_a_redirect(hub, tmp_path):
    fake, url = hub
    target = image(tmp_path, 5)
    target.parent.mkdir(parents=True)
    half = len(served(fake, 5)) // 2
    target.with_name(".imaging.nii.gz.part").write_bytes(served(fake, 5)[:half])
    summary = fetch("kits21", tmp_path, [" case_00005"], base_url=f"{url}/redirect", **FAST)
    assert summary.ok and target.read_bytes() == served(fake, 5)
    assert [(p, r) for _, p, r in fake.gets()] == [
        ("/redirect/images/case_00005.nii.gz", f"bytes={half}-"),
        ("/images/case_00005.nii.gz", f"bytes={half}-"),
    ]
    assert fetch("kits21", tmp_path, [], base_url=url, **FAST).downloaded == []


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    fake, url = hub
    path = "/images/case_00004.nii.gz"
    target = image(tmp_path, 4)
    target.parent.mkdir(parents=True)
    target.with_name(".imaging.nii.gz.part").write_bytes(b"stale bytes of an old transfer")
    fake.faults[path] = ["full"]
    summary = fetch("kits21", tmp_path, "4", base_url=url, **FAST)
    assert summary.ok and fake.gets(path)[0][2] == "bytes=30-"
    assert target.read_bytes() == served(fake, 4)


def test_corrupt_existing_target_is_detected_and_refetched(hub, tmp_path):
    fake, url = hub
    target = image(tmp_path, 0)
    target.parent.mkdir(parents=True)
    good = served(fake, 0)
    target.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    with pytest.raises(KitsnetError, match="gzip"):
        verify_image(target)
    summary = fetch("kits21", tmp_path, "0", base_url=url, **FAST)
    assert summary.downloaded == ["case_00000"] and "gzip" in summary.replaced["case_00000"]
    assert target.read_bytes() == good


def test_truncated_existing_target_is_refetched(hub, tmp_path):
    fake, url = hub
    target = image(tmp_path, 5)
    target.parent.mkdir(parents=True)
    target.write_bytes(served(fake, 5)[:-40])
    summary = fetch("kits21", tmp_path, "5", base_url=url, **FAST)
    assert summary.downloaded == ["case_00005"] and target.read_bytes() == served(fake, 5)


def test_transfer_served_corrupt_once_is_refetched(hub, tmp_path):
    fake, url = hub
    path = "/images/case_00001.nii.gz"
    fake.faults[path] = ["corrupt"]
    summary = fetch("kits21", tmp_path, "1", base_url=url, **FAST)
    assert summary.ok and len(fake.gets(path)) == 2
    assert fake.gets(path)[1][2] is None  # the corrupt .part was dropped, not resumed
    assert image(tmp_path, 1).read_bytes() == served(fake, 1)


@pytest.mark.parametrize("faults", [[503], [503, 503], [429, 502], ["cut", 503]])
def test_transient_http_errors_are_retried(hub, tmp_path, faults):
    fake, url = hub
    path = "/images/case_00002.nii.gz"
    fake.faults[path] = list(faults)
    summary = fetch("kits21", tmp_path, "2", base_url=url, retries=2, **FAST)
    assert summary.ok and len(fake.gets(path)) == len(faults) + 1
    assert image(tmp_path, 2).read_bytes() == served(fake, 2)
    if faults[0] == "cut":  # the 503 did not cost the bytes already received
        assert fake.gets(path)[-1][2] == f"bytes={len(served(fake, 2)) // 2}-"


def test_complete_part_is_verified_and_renamed_after_a_416(hub, tmp_path):
    fake, url = hub
    target = image(tmp_path, 3)
    target.parent.mkdir(parents=True)
    target.with_name(".imaging.nii.gz.part").write_bytes(served(fake, 3))
    summary = fetch("kits21", tmp_path, "3", base_url=url, **FAST)
    assert summary.ok and [r for _, _, r in fake.gets()] == [f"bytes={len(served(fake, 3))}-"]
    assert target.read_bytes() == served(fake, 3)


def test_overlong_part_is_dropped_and_fetched_again(hub, tmp_path):
    fake, url = hub
    target = image(tmp_path, 3)
    target.parent.mkdir(parents=True)
    target.with_name(".imaging.nii.gz.part").write_bytes(served(fake, 3) + b"junk")
    summary = fetch("kits21", tmp_path, "3", base_url=url, **FAST)
    assert summary.ok and [r for _, _, r in fake.gets()][-1] is None
    assert target.read_bytes() == served(fake, 3)


def test_a_body_that_is_not_nifti_never_becomes_the_target(hub, tmp_path):
    fake, url = hub
    fake.faults["/images/case_00004.nii.gz"] = ["noise", "noise"]
    summary = fetch("kits21", tmp_path, "4", base_url=url, retries=1, **FAST)
    assert "not a valid gzip" in summary.failed["case_00004"]
    assert not image(tmp_path, 4).exists()
    assert not list(tmp_path.rglob("*.part"))


def test_proxy_environment_variables_are_honoured(hub, tmp_path, monkeypatch):
    fake, url = hub
    # the fake hub doubles as the proxy; urllib treats https_proxy (the default, https base
    # URL) the same way, through the ProxyHandler fetch builds its opener with
    monkeypatch.setenv("http_proxy", url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    summary = fetch("kits21", tmp_path, "0", base_url="http://kits.invalid", **FAST)
    assert summary.ok and fake.proxied == ["http://kits.invalid/images/case_00000.nii.gz"]


def test_retries_run_out_and_the_case_is_reported(hub, tmp_path):
    fake, url = hub
    fake.faults["/images/case_00002.nii.gz"] = [503, 503, 503]
    summary = fetch("kits21", tmp_path, "2", base_url=url, retries=1, **FAST)
    assert (
        "HTTP 503" in summary.failed["case_00002"] and "2 attempts" in summary.failed["case_00002"]
    )
    assert not image(tmp_path, 2).exists()


def test_missing_case_is_named_others_succeed_and_cli_exits_nonzero(hub, tmp_path, capsys):
    fake, url = hub
    del fake.files["/images/case_00001.nii.gz"]
    argv = ["fetch", "kits21", "--out", str(tmp_path), "--cases", "0-2", "--base-url", url]
    rc = main([*argv, "--retries", "3"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "case_00001" in captured.err and "404" in captured.err
    assert "FAILED case_00001" in captured.out
    assert len(fake.gets("/images/case_00001.nii.gz")) == 1  # a 404 is not retried
    assert image(tmp_path, 0).exists() and image(tmp_path, 2).exists()
    assert not image(tmp_path, 1).parent.exists()  # no empty case folder left behind


def test_rerun_after_success_transfers_nothing(hub, tmp_path, capsys):
    fake, url = hub
    argv = ["fetch", "kits21", "--out", str(tmp_path), "--cases", "0-3", "--base-url", url]
    assert main(argv) == 0
    fake.log.clear()
    assert main(argv) == 0
    assert fake.log == []
    assert "4 already complete" in capsys.readouterr().out


def test_progress_line_on_a_terminal(hub, tmp_path, monkeypatch):
    _, url = hub

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    fetch("kits21", tmp_path, "0-1", base_url=url, backoff=0.01)
    text = __import__("sys").stderr.getvalue()
    assert "ETA" in text and "\r" in text and "[2/2]" in text


@pytest.mark.parametrize(
    ("spec", "dataset", "named"),
    [("295-305", "kits21", "300-305"), ("299,300", "kits23", "300"), ("589", "kits23", "589")],
)
def test_parse_cases_names_ids_outside_the_dataset(spec, dataset, named):
    with pytest.raises(KitsnetError, match=f"no case {named} "):
        parse_cases(spec, dataset)


def test_parse_cases_reads_ranges_and_defaults_to_all():
    assert parse_cases("0-2,42, case_00007", "kits21") == [
        "case_00000",
        "case_00001",
        "case_00002",
        "case_00007",
        "case_00042",
    ]
    assert len(parse_cases(None, "kits21")) == 300
    all23 = parse_cases(None, "kits23")
    assert len(all23) == 489 and all23[300] == "case_00400" and all23[-1] == "case_00588"
    for bad in ("x", "5-3", "1-"):
        with pytest.raises(KitsnetError, match="--cases"):
            parse_cases(bad, "kits21")


# --- a host that cannot be reached: one message, fast, nothing left behind ------------------


@pytest.fixture
def no_proxy(monkeypatch):
    """No proxy variables, whatever the machine running the tests has set."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)


def refused_port() -> int:
    """A port nothing listens on: bound (so it was free), then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_port_stops_all_300_cases_within_a_minute(no_proxy, tmp_path):
    port = refused_port()
    out = tmp_path / "data"
    argv = ["fetch", "kits21", "--cases", "0-299", "--out", str(out)]
    argv += ["--base-url", f"http://127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "kitsnet.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert run.returncode == 1 and seconds <= 60, (seconds, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # one message, not 300 failures or retry notes
    assert f"cannot reach 127.0.0.1:{port} (connection refused)" in lines[0]
    assert "no proxy" in lines[0] and run.stdout == ""
    assert not out.exists()  # no case_XXXXX/ folders, and not the --out folder it would make


def test_name_that_does_not_resolve_stops_the_run(no_proxy, tmp_path, capsys):
    start = time.monotonic()
    rc = main(
        ["fetch", "kits21", "--out", str(tmp_path), "--base-url", "http://nonexistent.invalid"]
    )
    assert rc == 1 and time.monotonic() - start <= 60
    err = capsys.readouterr().err.strip()
    assert "cannot reach nonexistent.invalid (name resolution failed" in err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_unreachable_proxy_is_named_without_its_password(no_proxy, tmp_path, monkeypatch):
    port = refused_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    with pytest.raises(KitsnetError) as info:
        fetch("kits21", tmp_path, "0-9", base_url="https://kits.invalid", **FAST)
    msg = str(info.value)
    assert f"its proxy http://user:***@127.0.0.1:{port} failed (connection refused)" in msg
    assert "HTTPS_PROXY=http://user:***@" in msg and "NO_PROXY=localhost" in msg
    assert "secret" not in msg


def test_unreachable_redirect_target_is_the_host_named(hub, tmp_path):
    fake, url = hub
    port = refused_port()
    cdn = f"http://127.0.0.1:{port}/images/case_00001.nii.gz"
    fake.faults["/images/case_00001.nii.gz"] = [cdn] * 3
    with pytest.raises(KitsnetError, match=f"cannot reach 127.0.0.1:{port} ") as info:
        fetch("kits21", tmp_path, "0-2", base_url=url, jobs=1, **FAST)
    assert "(1 of 3 cases done)" in str(info.value)
    assert len(fake.gets("/images/case_00001.nii.gz")) == 3  # two quick re-checks, no more
    assert fake.gets("/images/case_00002.nii.gz") == []  # no case starts after the verdict
    assert image(tmp_path, 0).read_bytes() == served(fake, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_00000"]


def test_a_host_that_answered_before_gets_the_full_backoff(no_proxy, tmp_path, capsys):
    class AnswerOnceThenGo(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.server.socket.close()  # from now on every connection is refused
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), AnswerOnceThenGo)
    host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.handle_request, daemon=True).start()
    with pytest.raises(KitsnetError, match=f"cannot reach {host} "):
        fetch("kits21", tmp_path, "0-3", base_url=f"http://{host}", jobs=1, retries=3, **FAST)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "retry" in ln]
    assert len(notes) == 3 and "HTTP 503" in notes[0] and "retry 1/3 now" in notes[0]
    assert "connection refused, retry 3/3 in" in notes[-1]
    assert list(tmp_path.iterdir()) == []


def test_retries_are_announced_on_stderr(hub, tmp_path, capsys):
    fake, url = hub
    fake.faults["/images/case_00002.nii.gz"] = [503, "cut"]
    summary = fetch("kits21", tmp_path, "2", base_url=url, retries=2, **FAST)
    assert summary.ok
    err = capsys.readouterr().err
    assert "case_00002: HTTP 503 Service Unavailable" in err and "retry 1/2 now" in err
    assert "case_00002: connection closed after" in err and "retry 2/2 in 0.0 s" in err


def test_a_case_folder_holding_other_files_is_kept_on_failure(hub, tmp_path):
    fake, url = hub
    del fake.files["/images/case_00003.nii.gz"]
    label = image(tmp_path, 3).with_name("aggregated_MAJ_seg.nii.gz")
    label.parent.mkdir(parents=True)
    label.write_bytes(b"labels")
    summary = fetch("kits21", tmp_path, "3", base_url=url, **FAST)
    assert "404" in summary.failed["case_00003"] and label.read_bytes() == b"labels"
