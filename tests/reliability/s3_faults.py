"""An HTTP proxy in front of moto's S3 server that injects what real clusters see: 500s (some only the first
time, which the S3 client's retries survive), 403 AccessDenied, 503 SlowDown bursts on many keys for a few
seconds, failing PUTs on chosen keys (n times or always), dropped connections and latency.

    proxy = FaultProxy(endpoint, {"a.jpg": (500, 1)})         # the rules API: GET/HEAD on keys containing a.jpg
    proxy.burst("CoCA/image/", seconds=2.0)                    # 503 SlowDown on every request under a prefix
    proxy.fail_puts("masks/", times=2)                         # the first two PUTs there answer 500
    proxy.add(Fault("x.jpg", status=RESET, methods=("GET",)))  # connection dropped without an answer
    proxy.latency("predictions/", 0.2)                         # every matching request waits 0.2 s
"""
from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

RESET = 0  # Fault.status: close the connection without answering (a connection reset for the client)


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()


ERRORS = {
    500: _error("InternalError", "We encountered an internal error. Please try again."),
    403: _error("AccessDenied", "Access Denied"),
    503: _error("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    """Fails requests whose key contains ``pattern`` and whose method is in ``methods``: with ``status`` (an
    S3 error answer from ERRORS, or RESET), the first ``times`` matching requests (None: all), only during
    ``seconds`` after it was added (None: no window); ``delay`` seconds of latency first (with status None the
    request then goes through). ``name`` keys ``hits`` and ``injected`` (default: the pattern)."""

    pattern: str
    status: int | None = 500
    times: int | None = None
    methods: tuple[str, ...] = ("GET", "HEAD")
    seconds: float | None = None
    delay: float = 0.0
    name: str = ""
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.name = self.name or self.pattern


class FaultProxy:
    """rules: key substring -> (status, times); times=None fails every GET/HEAD for that key. More faults with
    ``add``, ``burst``, ``fail_puts`` and ``latency``. ``hits[name]`` counts matching requests,
    ``injected[f"{status}:{name}"]`` the faults answered (status 0: connections dropped)."""

    def __init__(self, upstream: str, rules: dict[str, tuple[int, int | None]] | None = None):
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = [Fault(pattern, status, times) for pattern, (status, times) in (rules or {}).items()]
        self.hits: Counter = Counter()
        self.injected: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = unquote(urlsplit(self.path).path)
                fault = proxy._match(self.command, key)
                if fault is not None:
                    if fault.status == RESET:
                        self.close_connection = True
                        self.connection.shutdown(2)  # socket.SHUT_RDWR
                        return
                    payload = ERRORS[fault.status] if self.command != "HEAD" else b""
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but must still give the object's size
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def rules(self) -> dict[str, tuple[int, int | None]]:
        """The faults as the rules API wrote them (pattern -> (status, times))."""
        return {f.pattern: (f.status, f.times) for f in self.faults}

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def burst(self, pattern: str = "", seconds: float = 2.0, status: int = 503,
              methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")) -> Fault:
        """Every request on keys containing ``pattern`` answers ``status`` (SlowDown) for ``seconds`` from now."""
        return self.add(Fault(pattern, status, None, methods, seconds=seconds, name=f"burst:{pattern}"))

    def fail_puts(self, pattern: str, times: int | None = None, status: int = 500) -> Fault:
        """PUTs (and multipart POSTs) on keys containing ``pattern`` answer ``status``: the first ``times``,
        or all of them."""
        return self.add(Fault(pattern, status, times, ("PUT", "POST"), name=f"put:{pattern}"))

    def latency(self, pattern: str, seconds: float, methods: tuple[str, ...] = ("GET", "HEAD", "PUT")) -> Fault:
        return self.add(Fault(pattern, None, None, methods, delay=seconds, name=f"latency:{pattern}"))

    def remove(self, fault: Fault) -> None:
        with self.lock:
            self.faults.remove(fault)

    def _match(self, method: str, key: str) -> Fault | None:
        """The fault that answers this request (None: forward it), after any latency that applies."""
        delay, answer = 0.0, None
        with self.lock:
            now = time.monotonic()
            for fault in self.faults:
                if fault.pattern not in key or method not in fault.methods:
                    continue
                if fault.seconds is not None and now - fault.started > fault.seconds:
                    continue
                self.hits[fault.name] += 1
                delay = max(delay, fault.delay)
                if fault.status is not None and answer is None and (
                        fault.times is None or self.hits[fault.name] <= fault.times):
                    self.injected[f"{fault.status}:{fault.name}"] += 1
                    answer = fault
        if delay:
            time.sleep(delay)
        return answer

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
