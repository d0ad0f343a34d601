"""A flaky object store for the tests: an HTTP proxy on 127.0.0.1 in front of the moto S3 server
that injects the faults real object stores produce, at a configurable rate, from a seeded RNG.

Everything of ours reaches it exactly like S3 (s3fs -> aiobotocore -> aiohttp over HTTP): point
``endpoint_url`` at :attr:`FlakyS3Proxy.endpoint` instead of moto's. Requests are forwarded to
moto; a request picked for a fault gets one of these instead (or on top):

===============  ==============================================================================
kind             what the client sees
===============  ==============================================================================
``slowdown``     HTTP 503 with the S3 ``SlowDown`` XML error body (throttling); moto never sees it
``internal``     HTTP 500 with the S3 ``InternalError`` XML error body; moto never sees it
``reset``        the TCP connection reset (RST). Half the time (always for POSTs: multipart
                 create/complete) before moto sees the request, half-way through an upload's
                 body; otherwise, for idempotent requests (GET, HEAD, PUT, DELETE), *after* moto
                 executed it: the answer is lost, a GET's body cut in the middle
``truncate``     GET only: ``Content-Length: N`` but fewer bytes sent, then the connection closed
``slow``         the response delayed by ``slow_seconds`` (a slow store, not an error)
===============  ==============================================================================

More kinds are never drawn at random; a test asks for them with :meth:`FlakyS3Proxy.force`,
because no HTTP client can tell them from the truth (a lying cache or middlebox, a store that
answers from a stale replica):

* ``short`` / ``empty``: a GET answered with a third of / none of its bytes, *consistently
  framed* (``Content-Length`` and ``Content-Range`` rewritten to match, and no ``x-amz-checksum-*``
  header, like the many S3-compatible stores that keep no checksums: with one, botocore's
  response checksum validation would turn the short body into an error);
* ``head_zero`` / ``head_short``: a HEAD reporting 0 bytes / half the size of an object.

Request bodies are read as sent (``Content-Length`` or HTTP/1.1 chunked, including the
``aws-chunked`` uploads of newer botocore, whose payload is forwarded byte for byte) and forwarded
to moto with a plain ``Content-Length``. Injected faults are counted by kind (:attr:`counts`) and
kept with the operation they hit (:attr:`faults`), so a test can check what it really survived.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RANDOM_KINDS = ("slowdown", "internal", "reset", "truncate", "slow")
FORCED_ONLY_KINDS = ("short", "empty", "head_zero", "head_short")
ALL_KINDS = RANDOM_KINDS + FORCED_ONLY_KINDS
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "trailers", "transfer-encoding", "upgrade", "expect", "content-length"}
_IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Request:
    """What a fault rule or a fault record sees of one request."""

    method: str
    path: str  # URL path, unquoted (``/bucket/key``)
    query: str
    op: str  # GET, HEAD, PUT, DELETE, LIST, PART (multipart part upload), MPU_CREATE, MPU_COMPLETE, ...

    @property
    def key(self) -> str:
        """``bucket/key`` (no leading slash)."""
        return self.path.lstrip("/")


@dataclass(frozen=True)
class Fault:
    kind: str
    op: str
    method: str
    path: str
    forced: bool = False  # asked for with force(), not drawn at random


@dataclass
class _Rule:
    kinds: list[str]
    match: Callable[[Request], bool]


@dataclass
class _Counters:
    requests: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)


def classify(method: str, path: str, query: str) -> str:
    """The S3 operation of a request, coarsely (enough to say which kinds of calls were hit)."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    has_key = "/" in path.strip("/")
    if method == "GET" and not has_key:
        return "LIST"
    if method == "PUT" and "partNumber" in params and "uploadId" in params:
        return "PART"
    if method == "POST" and "uploads" in params:
        return "MPU_CREATE"
    if method == "POST" and "uploadId" in params:
        return "MPU_COMPLETE"
    if method == "POST" and "delete" in params:
        return "DELETE_MANY"
    if method == "DELETE" and "uploadId" in params:
        return "MPU_ABORT"
    return method


class FlakyS3Proxy:
    """The proxy; use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        upstream: the moto endpoint (``http://127.0.0.1:PORT``).
        rate: probability that a request gets a random fault (0 disables random faults).
        seed: seed of the RNG that draws the faults.
        kinds: the kinds drawn at random (a subset of :data:`RANDOM_KINDS`).
        slow_seconds: delay range of ``slow`` faults.
        only: optional predicate; requests it rejects never get a random fault.
    """

    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 0, kinds: tuple[str, ...] = RANDOM_KINDS,
                 slow_seconds: tuple[float, float] = (0.2, 0.6), only: Callable[[Request], bool] | None = None) -> None:
        unknown = set(kinds) - set(RANDOM_KINDS)
        if unknown:
            raise ValueError(f"unknown random fault kinds {sorted(unknown)}; expected some of {RANDOM_KINDS}")
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.rate, self.kinds, self.slow_seconds, self.only = rate, tuple(kinds), slow_seconds, only
        self.rng = random.Random(seed)  # which requests fail: one draw per request, in arrival order
        self._aux = random.Random(seed + 1)  # kinds, delays, reset placement
        self._lock = threading.RLock()
        self._rules: list[_Rule] = []
        self._c = _Counters()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FlakyS3Proxy:
        proxy = self

        class Handler(_ProxyHandler):
            pass

        Handler.proxy = proxy
        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="flaky-s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FlakyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    # ------------------------------------------------------------------ control
    def force(self, kinds: list[str] | str, *, method: str | None = None, op: str | None = None,
              path_contains: str | None = None, match: Callable[[Request], bool] | None = None) -> None:
        """The next requests that match get ``kinds``, one each, in order (before any random fault)."""
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {ALL_KINDS}")

        def matches(req: Request) -> bool:
            return ((method is None or req.method == method) and (op is None or req.op == op)
                    and (path_contains is None or path_contains in req.path) and (match is None or match(req)))

        with self._lock:
            self._rules.append(_Rule(kinds, matches))

    def pending_forced(self) -> int:
        with self._lock:
            return sum(len(r.kinds) for r in self._rules)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No random faults inside the block (forced ones still apply)."""
        with self._lock:
            saved, self.rate = self.rate, 0.0
        try:
            yield
        finally:
            with self._lock:
                self.rate = saved

    def reset_counts(self) -> None:
        with self._lock:
            self._c = _Counters()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._c.faults)

    @property
    def counts(self) -> Counter[str]:
        """Injected faults by kind."""
        return Counter(f.kind for f in self.faults)

    @property
    def requests(self) -> Counter[str]:
        """Requests seen, by operation."""
        with self._lock:
            return Counter(self._c.requests)

    def summary(self) -> dict[str, Any]:
        faults = self.faults
        return {"requests": sum(self.requests.values()), "requests_by_op": dict(sorted(self.requests.items())),
                "faults": len(faults), "forced": sum(f.forced for f in faults),
                "faults_by_kind": dict(sorted(Counter(f.kind for f in faults).items())),
                "faults_by_op": dict(sorted(Counter(f.op for f in faults).items()))}

    # ------------------------------------------------------------------ decisions
    def _choose(self, req: Request) -> Fault | None:
        """The fault for this request (recorded), or None."""
        with self._lock:
            self._c.requests[req.op] += 1
            kind, forced = self._draw(req), False
            for rule in self._rules:
                if rule.kinds and rule.match(req):
                    kind, forced = rule.kinds.pop(0), True
                    self._rules = [r for r in self._rules if r.kinds]
                    break
            if kind is None:
                return None
            fault = Fault(kind, req.op, req.method, req.path, forced)
            self._c.faults.append(fault)
            return fault

    def _draw(self, req: Request) -> str | None:
        """A random fault kind or None; exactly one RNG draw per eligible request, so a seed always
        gives the same number of faults over the same number of requests, whatever their order."""
        with self._lock:
            if self.rate <= 0 or (self.only is not None and not self.only(req)) or self.rng.random() >= self.rate:
                return None
            usable = [k for k in self.kinds if k != "truncate" or req.method == "GET"]
            if not usable:
                return None
            # the least used applicable kind (ties broken by the RNG): every kind shows up early
            used = Counter(f.kind for f in self._c.faults)
            fewest = min(used[k] for k in usable)
            return self._aux.choice([k for k in usable if used[k] == fewest])

    def _aux_uniform(self, a: float, b: float) -> float:
        with self._lock:
            return self._aux.uniform(a, b)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients dropping connections (and our own resets) are expected here


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are dropped after this
    proxy: FlakyS3Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # ------------------------------------------------------------------ one request
    def _handle(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        req = Request(self.command, path, parsed.query, classify(self.command, path, parsed.query))
        length = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        has_body = chunked or bool(length and int(length) > 0)
        fault = None if path.startswith("/moto-api") else self.proxy._choose(req)
        kind = fault.kind if fault is not None else None

        # a reset either before moto sees the request (an upload cut half-way) or, for idempotent
        # requests, after moto executed it (the answer lost, half a GET body sent)
        if kind == "reset" and (self.command not in _IDEMPOTENT or self.proxy._aux_uniform(0, 1) < 0.5):
            if has_body and not chunked:
                self.rfile.read(max(0, int(length) // 2))  # type: ignore[arg-type]
            self._reset()
            return
        body = self._read_body(length, chunked)
        if kind in _ERRORS:
            self._error(*_ERRORS[kind])
            return
        if kind == "slow":
            time.sleep(self.proxy._aux_uniform(*self.proxy.slow_seconds))

        status, reason, headers, data = self._forward(body)

        if kind == "reset":
            if self.command == "GET" and len(data) > 1:
                self._send_head(status, reason, headers, len(data))
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            self._reset()  # after moto: executed, the answer lost
            return
        if kind == "truncate" and len(data) >= 1:
            self._send_head(status, reason, headers, len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._close_gracefully()
            return
        if kind in ("short", "empty") and self.command == "GET" and 200 <= status < 300 and len(data) > 0:
            data = data[: len(data) // 3] if kind == "short" else b""
            headers = [(k, _shorter_range(v, len(data)) if k.lower() == "content-range" else v) for k, v in headers
                       if not k.lower().startswith("x-amz-checksum-")]
        if kind in ("head_zero", "head_short") and self.command == "HEAD" and 200 <= status < 300:
            size = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", "0" if kind == "head_zero" else str(size // 2)))
        self._send_head(status, reason, headers, len(data))
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _read_body(self, length: str | None, chunked: bool) -> bytes:
        if chunked:
            parts = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
        if length:
            return self.rfile.read(int(length))
        return b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":  # a HEAD's Content-Length is the object's size: pass it on
                headers += [(k, v) for k, v in resp.getheaders() if k.lower() == "content-length"]
            return resp.status, resp.reason, headers, data
        finally:
            conn.close()

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD" or not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _error(self, status: int, reason: str, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), like a load balancer dropping it."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()

    def _close_gracefully(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)


def _shorter_range(value: str, length: int) -> str:
    """``bytes a-b/total`` rewritten to cover ``length`` bytes from ``a``."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
    except ValueError:
        return value
    return f"{unit} {start}-{start + max(length, 1) - 1}/{total}"
