"""A fault-injecting HTTP proxy on loopback in front of the S3 endpoint.

Every S3 call of the integration tests (driver and Ray workers alike) goes through it. With
`fault_every` = n, every n-th request is answered 503 SlowDown or 500 InternalError, or
(GETs) gets its response cut mid-body, the kinds taken in turn; requests whose path contains
`always_fail` are always answered 503. It forwards everything else unchanged (moto does not check signatures).
`calls` counts the requests by method and key. With `delay_s` every request waits that long first: an object store's latency (S3 answers a
GET in tens of milliseconds), on loopback.

`S3Server` runs moto's server and the proxy in a process of their own (`python faulty_s3.py`),
so that serving S3 never competes with the test's own Ray driver for one interpreter. The
test sets the faults and reads the counts through the proxy's control path, `/__proxy__`,
which is never relayed.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections import Counter
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
                if self.path == CONTROL:
                    data = json.dumps(proxy.control(self.command, json.loads(body) if body else {})).encode()
                    self._send(200, {"Content-Type": "application/json"}, data)
                    return
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

    def control(self, method: str, settings: dict) -> dict:
        """The control path: a POST sets fault_every, always_fail or delay_s, or clears the
        call counts; every answer holds the injected faults and the call counts."""
        with self._lock:
            if method == "POST":
                for key in ("fault_every", "always_fail", "delay_s"):
                    if key in settings:
                        setattr(self, key, settings[key])
                if settings.get("clear_calls"):
                    self.calls.clear()
            return {"injected": dict(self.injected),
                    "calls": [[method, path, n] for (method, path), n in self.calls.items()]}

    def start(self) -> FaultyProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CONTROL = "/__proxy__"


class CallCounts:
    """The proxy's call counts as the test reads them: (method, path) -> requests."""

    def __init__(self, server: S3Server):
        self._server = server

    def items(self):
        return Counter({(method, path): n for method, path, n in self._server._control("GET")["calls"]}).items()

    def clear(self) -> None:
        self._server._control("POST", clear_calls=True)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class S3Server:
    """moto's S3 server behind the proxy, in a child process; the same settings and counts
    as FaultyProxy, read and set over loopback."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 server process ended at start (exit {self.process.wait()})")
        self.port = json.loads(line)["port"]
        self.calls = CallCounts(self)

    def _control(self, method: str, **settings) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, CONTROL, body=json.dumps(settings) if method == "POST" else None)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    @property
    def injected(self) -> dict:
        return self._control("GET")["injected"]

    def __setattr__(self, key, value):
        if key in ("fault_every", "always_fail", "delay_s"):
            self._control("POST", **{key: value})
        else:
            super().__setattr__(key, value)

    def stop(self) -> None:
        self.process.stdin.close()  # the child ends when its stdin does
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve() -> None:
    """The child's side: moto and the proxy until stdin closes (also when the test process dies)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultyProxy(*server.get_host_and_port()).start()
    print(json.dumps({"port": proxy.port}), flush=True)
    sys.stdin.read()
    proxy.stop()
    server.stop()


if __name__ == "__main__":
    serve()
