"""The HTTP side of ``kitsnet fetch``: one ranged GET, and every failure sorted by what helps.

Kept apart from :mod:`kitsnet.data.fetch` (which cases, where files go, when to retry) because it
changes for other reasons: what a server or a proxy answers, and how urllib reports it.

A failure is one of: :class:`Transient` (time-out, 5xx, 429, cut transfer: retrying helps),
:class:`Unreachable` (no connection can be made at all: name resolution failed, connection
refused, no route; retrying 300 cases against it only wastes hours, so the run stops),
:class:`Permanent` (404, 403, bad URL, untrusted certificate: retrying cannot help).
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request

_USER_AGENT = "kitsnet-fetch/0.1 (python urllib)"

# the variables urllib reads on POSIX for the schemes fetch uses (lower case wins over upper)
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


class Transient(Exception):
    """A failure worth retrying (network, 5xx, 429, cut transfer, corrupt transfer)."""

    def __init__(self, message: str, wait: float | None = None, restart: bool = False) -> None:
        super().__init__(message)
        self.wait = wait  # seconds the server asked for (Retry-After); None: exponential backoff
        self.restart = restart  # the .part cannot be resumed: drop it, retry at once from zero


class Unreachable(Transient):
    """No connection to ``host`` could be made (DNS, refused, no route).

    A subclass of :class:`Transient` because a host that has answered earlier in the run may
    just be restarting; one that never answered is judged unreachable after a quick re-check.
    """

    def __init__(self, host: str, why: str, url: str) -> None:
        super().__init__(f"cannot connect to {host}: {why}")
        self.host, self.why, self.url = host, why, url

    def verdict(self) -> str:
        """The one message a stopped run prints: the host, the cause, the proxy settings."""
        scheme = urllib.parse.urlsplit(self.url).scheme
        proxy = urllib.request.getproxies().get(scheme)
        what = f"cannot reach {self.host} ({self.why})"
        if proxy and not urllib.request.proxy_bypass(self.host):
            what = f"cannot reach {self.host}: its proxy {redact(proxy)} failed ({self.why})"
        return (
            f"{what}; proxy settings: {proxy_settings()}. Stopped before trying the other "
            "cases: check the network and the proxy variables, or give a reachable mirror "
            "with --base-url; a rerun resumes."
        )


class Permanent(Exception):
    """A failure retrying cannot fix (404, 403, bad URL, certificate)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone  # the server has no such file: a .part of it is no use either


class Whole(Exception):
    """The server says the ``.part`` already holds every byte (416 at offset == size)."""


class Cancelled(Exception):
    """The run is being stopped (Ctrl-C, or the host is unreachable); .part files stay."""


def redact(value: str) -> str:
    """Hide a password in ``http://user:secret@proxy:3128``: error messages end up in logs."""
    return re.sub(r"(//[^:/@\s]+):[^@/\s]*@", r"\1:***@", value)


def proxy_settings() -> str:
    """The proxy variables set in the environment, as urllib will use them, or "no proxy"."""
    found = [f"{n}={redact(os.environ[n])}" for n in PROXY_VARIABLES if os.environ.get(n)]
    return ", ".join(found) if found else "no proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY unset)"


def host_of(url: str) -> str:
    """``host`` or ``host:port`` of ``url`` (no credentials): another port, another server."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or url
    return f"{host}:{parts.port}" if parts.port else host


class HostLog(urllib.request.BaseHandler):
    """Which host each thread asked last and which hosts have answered at all.

    A request processor sees every hop of a redirect chain (Hugging Face sends ``resolve/``
    URLs on to a CDN), so the host named in an :class:`Unreachable` is the one that failed,
    not the one in ``--base-url``.  Runs before urllib's error processor (order 1000), so a
    404 or a 302 still counts as an answer.
    """

    handler_order = 400

    def __init__(self) -> None:
        self._local = threading.local()
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _host(req: urllib.request.Request) -> str:
        return host_of(req.full_url)

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        self._local.host = self._host(req)
        return req

    def http_response(
        self, req: urllib.request.Request, resp: http.client.HTTPResponse
    ) -> http.client.HTTPResponse:
        with self._lock:
            self._answered.add(self._host(req))
        return resp

    https_request = http_request
    https_response = http_response

    def current(self, default: str) -> str:
        return getattr(self._local, "host", None) or default

    def answered(self, host: str) -> bool:
        with self._lock:
            return host in self._answered


def build_opener(hosts: HostLog) -> urllib.request.OpenerDirector:
    """urllib with the environment's proxies (and NO_PROXY) and the host log."""
    return urllib.request.build_opener(urllib.request.ProxyHandler(), hosts)


def _unreachable_why(reason: object) -> str | None:
    """Name the failure if it says no connection can be made, else None (it may be transient)."""
    if isinstance(reason, socket.gaierror):
        return f"name resolution failed: {reason.strerror or reason}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"no route: {reason.strerror}"
    return None


def total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 100); ``bytes */100`` -> (None, 100); junk -> (None, None)."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+)", (value or "").strip())
    return (int(m[1]) if m and m[1] else None), (int(m[2]) if m else None)


def _http_error(exc: urllib.error.HTTPError, url: str) -> Exception:
    """Classify an HTTP error status: 429 and 5xx are retried, other 4xx are final."""
    exc.close()
    what = f"HTTP {exc.code} {exc.reason} for {url}"
    if exc.code == 429 or exc.code >= 500:
        after = (exc.headers.get("Retry-After") or "").strip()
        return Transient(what, wait=float(after) if after.isdigit() else None)
    return Permanent(what, gone=400 <= exc.code < 500)


def open_range(
    opener: urllib.request.OpenerDirector, hosts: HostLog, url: str, offset: int, timeout: float
) -> http.client.HTTPResponse:
    """GET ``url`` from byte ``offset``; map every failure to one of this module's exceptions."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is already whole, or longer than the file
            exc.close()
            total = total_from_content_range(exc.headers.get("Content-Range"))[1]
            if total == offset:
                raise Whole() from None
            raise Transient(f"HTTP 416 at byte {offset} (file is {total})", 0, True) from exc
        raise _http_error(exc, url) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise Permanent(f"TLS certificate not trusted for {url}: {exc.reason}") from exc
        why = _unreachable_why(exc.reason)
        if why is not None:
            raise Unreachable(hosts.current(host_of(url)), why, url) from exc
        raise Transient(f"cannot connect for {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"connection failed for {url}: {exc!r}") from exc
    except ValueError as exc:
        raise Permanent(f"bad URL {url}: {exc}") from exc
