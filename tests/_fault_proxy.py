"""A fault-injecting HTTP proxy in front of the test S3 server, on 127.0.0.1: a flaky object store.

Each request is, by a seeded draw, answered ``503 SlowDown`` (S3's throttling reply, the request never
reaches the server), or its connection is reset (half before forwarding, half after the server did the
work and before the reply is complete), or forwarded as it came. A request whose path contains a key of
``fail`` always gets that key's ``(status, code)`` (``(503, "SlowDown")`` that no retry gets past,
``(403, "AccessDenied")``). ``counts`` says what happened, ``paths`` how often each path was asked for.
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>Injected by the fault proxy.</Message><RequestId>fault-proxy</RequestId></Error>"
)


class FaultProxy(ThreadingHTTPServer):
    """``with FaultProxy(upstream) as proxy: ... proxy.url ... proxy.counts``.

    Args:
        upstream: the S3 server's ``http://host:port``.
        slowdown: share of requests answered 503 SlowDown.
        reset: share of requests whose connection is reset.
        seed: of the draws (the threads' interleaving still varies which request gets which).
    """

    daemon_threads = True

    def __init__(self, upstream: str, *, slowdown: float = 0.05, reset: float = 0.01, seed: int = 0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream)
        self.slowdown, self.reset = slowdown, reset
        self.fail: dict[str, tuple[int, str]] = {}
        self.counts = {"requests": 0, "slowdown": 0, "reset_before": 0, "reset_after": 0, "failed": 0}
        self.paths: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._resets: set[socket.socket] = set()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    @property
    def faults(self) -> int:
        return self.counts["slowdown"] + self.counts["reset_before"] + self.counts["reset_after"]

    def draw(self, path: str) -> str:
        """What to do with one request: "failed", "slowdown", "reset_before", "reset_after" or "forward"."""
        with self._lock:
            self.counts["requests"] += 1
            self.paths[path.split("?")[0]] += 1
            x = self._rng.random()
            if any(f in path for f in self.fail):
                fate = "failed"
            elif x < self.slowdown:
                fate = "slowdown"
            elif x < self.slowdown + self.reset:
                fate = "reset_before" if x < self.slowdown + self.reset / 2 else "reset_after"
            else:
                return "forward"
            self.counts[fate] += 1
            return fate

    def mark_reset(self, sock: socket.socket) -> None:
        # SO_LINGER 0: closing sends a TCP RST, as a dropped connection does, instead of a clean FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._lock:
            self._resets.add(sock)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self._lock:
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            self.close_request(request)  # no shutdown(SHUT_WR) first: that would send a FIN
        else:
            super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        self.server.mark_reset(self.connection)
        self.close_connection = True

    def _handle(self) -> None:
        body = self._body()
        fate = self.server.draw(self.path)
        if fate in ("slowdown", "failed"):
            failed = [v for f, v in self.server.fail.items() if f in self.path]
            status, code = failed[0] if failed else (503, "SlowDown")
            error = _ERROR.format(code=code).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(error)
            return
        if fate == "reset_before":
            return self._reset()
        up = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))  # Host stays the client's: it is signed
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            reply_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            status, reason = resp.status, resp.reason
        finally:
            up.close()
        if fate == "reset_after":  # the server did the work; the client sees half a reply, then a reset
            self.wfile.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(data) + 100}\r\n\r\n".encode()
            )
            self.wfile.write(data[: len(data) // 2])
            return self._reset()
        self.send_response(status, reason)
        for k, v in reply_headers:
            if k.lower() != "content-length" or self.command == "HEAD":
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
