"""A fault-injecting HTTP proxy on loopback in front of the S3 endpoint.

Every S3 call of the integration tests (driver and Ray workers alike) goes through it. With
`fault_every` = n, every n-th request is answered 503 SlowDown or 500 InternalError, or
(GETs) gets its response cut mid-body, the kinds taken in turn; requests whose path contains
`always_fail` are always answered 503. It forwards everything else unchanged (moto does not check signatures).
`calls` counts the requests by method and key. With `delay_s` every request waits that long first: an object store's latency (S3 answers a
GET in tens of milliseconds), on loopback.
"""

from __future__ import annotations

import http.client
from collections import Counter
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
}


class FaultyProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.fault_every = 0  # 0: no faults
        self.delay_s = 0.0  # added to every request
        self.always_fail: str | None = None
        self.injected = {"503": 0, "500": 0, "cut": 0}
        self.requests = 0
        self.calls: Counter = Counter()  # (method, path without the query) -> requests
        self._turn = {"GET": 0, "other": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes; with Nagle's algorithm the body then
            # waits for the client's delayed ACK, 40 ms on every request
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                fault = proxy._choose(self.command, self.path)
                if fault in (503, 500):
                    headers = {"Content-Type": "application/xml", "Content-Length": str(len(ERRORS[fault]))}
                    self._send(fault, headers, ERRORS[fault] if self.command != "HEAD" else b"")
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                out = {k: v for k, v in response.getheaders() if k.lower() not in ("connection", "transfer-encoding")}
                out["Content-Length"] = str(len(data)) if self.command != "HEAD" else out.get("Content-Length", "0")
                if fault == "cut" and len(data) > 1:
                    self.send_response(response.status)
                    for key, value in out.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(response.status, out, data if self.command != "HEAD" else b"")

            def _send(self, status, headers, data):
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", headers.get("Content-Length", str(len(data))))
                self.end_headers()
                if data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _choose(self, method: str, path: str):
        with self._lock:
            self.requests += 1
            self.calls[method, path.split("?", 1)[0]] += 1
            if self.always_fail and self.always_fail in path:
                self.injected["503"] += 1
                return 503
            if not self.fault_every or self.requests % self.fault_every:
                return None
            kinds = [503, 500, "cut"] if method == "GET" else [503, 500]
            turn = "GET" if method == "GET" else "other"
            kind = kinds[self._turn[turn] % len(kinds)]
            self._turn[turn] += 1
            self.injected[str(kind)] += 1
            return kind

    def start(self) -> FaultyProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
