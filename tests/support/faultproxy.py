"""An HTTP proxy in front of the real API server that answers chosen requests with a fault.

The operator talks plain HTTP to the proxy (its kubeconfig points there) and the proxy talks
TLS to kube-apiserver, passing the operator's own bearer token through: the server still
authenticates and authorizes every request, and watch streams are relayed chunk by chunk.
A test arms faults that the real server produces only by chance: a watch answered with
`410 Gone` (an ERROR event, as the server sends when a resourceVersion was compacted) or a
request answered with `409 Conflict`. Each fault fires a given number of times; `hits`
counts them.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


@dataclass
class Fault:
    name: str
    method: str
    path: re.Pattern[str]
    watch: bool | None  # True: only watch requests; False: only others; None: both
    times: int


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FaultProxy:
    def __init__(self, upstream: str, ca_pem: str) -> None:
        self.upstream = upstream.rstrip("/")
        ctx = ssl.create_default_context(cadata=ca_pem)
        self.http = urllib3.PoolManager(maxsize=32, ssl_context=ctx, retries=False)
        self.faults: list[Fault] = []
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="fault-proxy")

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def arm(self, name: str, method: str, path: str, *, watch: bool | None = None,
            times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(name, method, re.compile(path), watch, times))
            self.hits.setdefault(name, 0)

    def _take(self, method: str, path: str, watch: bool) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if (f.times > 0 and f.method == method and f.path.search(path)
                        and f.watch in (None, watch)):
                    f.times -= 1
                    self.hits[f.name] += 1
                    return f
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        watch = "watch=true" in h.path or "watch=1" in h.path
        fault = self._take(h.command, h.path.split("?")[0], watch)
        if fault is not None and watch:
            self._send(h, 200, json.dumps({"type": "ERROR", "object": status(
                410, "Expired", "too old resource version (injected)")}).encode() + b"\n")
            return
        if fault is not None:
            self._send(h, 409, json.dumps(status(
                409, "Conflict", "Operation cannot be fulfilled: the object has been "
                "modified; please apply your changes to the latest version and try again "
                "(injected)")).encode())
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP | {"host"}}
        try:
            r = self.http.request(h.command, self.upstream + h.path, body=body,
                                  headers=headers, preload_content=False,
                                  timeout=urllib3.Timeout(connect=5, read=None if watch
                                                          else 60))
        except urllib3.exceptions.HTTPError as e:
            self._send(h, 503, json.dumps(status(503, "ServiceUnavailable", str(e))).encode())
            return
        try:
            h.send_response(r.status)
            for k, v in r.headers.items():
                if k.lower() not in HOP:
                    h.send_header(k, v)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for chunk in r.stream(65536, decode_content=False):
                if chunk:
                    h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (OSError, urllib3.exceptions.HTTPError):
            h.close_connection = True
        finally:
            r.release_conn()

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, payload: bytes) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()
