"""An HTTP proxy in front of moto's S3 server that fails chosen objects: 500s (some only the first time,
which the S3 client's retries survive) and 403 AccessDenied."""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ERRORS = {
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
         b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    403: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
         b"<Message>Access Denied</Message></Error>",
}


class FaultProxy:
    """rules: key substring -> (status, times); times=None fails every request for that key."""

    def __init__(self, upstream: str, rules: dict[str, tuple[int, int | None]]):
        self.upstream = urlsplit(upstream)
        self.rules = rules
        self.hits: Counter = Counter()
        self.injected: Counter = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = unquote(urlsplit(self.path).path)
                if self.command in ("GET", "HEAD"):
                    for pattern, (status, times) in proxy.rules.items():
                        if pattern in key:
                            proxy.hits[pattern] += 1
                            if times is None or proxy.hits[pattern] <= times:
                                proxy.injected[f"{status}:{pattern}"] += 1
                                payload = ERRORS[status] if self.command == "GET" else b""
                                self.send_response(status)
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

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
