"""S3 calls retry within a bounded total time (issue 16 item 4): a hung server gives up in
seconds (it took 302 s), a server down for about 3 s is outlasted by the default policy."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meritrun.errors import TransientError
from meritrun.storage.policies import RetryPolicy
from meritrun.storage.s3 import S3Storage


def _store(endpoint: str, retry: RetryPolicy | None = None) -> S3Storage:
    return S3Storage("bkt", endpoint=endpoint, region="us-east-1", access_key="a",
                     secret_key="b", retry=retry)


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_the_default_policy_bounds_a_call_to_seconds():
    p = RetryPolicy()
    worst = p.deadline_s + p.connect_timeout_s + p.read_timeout_s
    assert worst <= 35, worst  # one call against a hung server, retries included


def test_a_hung_server_gives_up_within_the_deadline(hung_endpoint):
    retry = RetryPolicy(read_timeout_s=0.5, deadline_s=1.5, base_delay_s=0.05)
    start = time.monotonic()
    with pytest.raises(TransientError, match=r"cannot reach.*gave up after [2-9] attempts"):
        _store(hung_endpoint, retry).get_bytes("k")
    assert time.monotonic() - start < 1.5 + 0.5 + 1.0


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_a_three_second_outage_is_outlasted_by_the_default_policy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused until the server is up
    up = threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def come_back() -> None:
        time.sleep(3.0)
        server = ThreadingHTTPServer(("127.0.0.1", port), Ok)
        server.daemon_threads, server.block_on_close = True, False
        servers.append(server)
        up.set()
        server.serve_forever()

    thread = threading.Thread(target=come_back, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        assert _store(f"http://127.0.0.1:{port}").get_bytes("k") == b"ok"
        assert 3.0 <= time.monotonic() - start < 12.0
    finally:
        up.wait(10)
        for server in servers:
            server.shutdown()
            server.server_close()
        thread.join(5)
