"""Fails any test that leaves child processes running; stops servers and pod processes.

Session-wide servers (the control plane) are started inside whichever test first needs them
and live until the session ends: they register their pids with `keep`, and only those are
exempt.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

_KEPT: set[int] = set()
_SERVERS: set[Any] = set()


def keep(pid: int) -> None:
    """Exempt a session-wide process from the leak check (until `forget`)."""
    _KEPT.add(pid)


def forget(pid: int) -> None:
    _KEPT.discard(pid)


def stop_process(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL: servers that linger (weed can take
    30 s) must not slow the suite, and none may outlive it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def process_tree(pid: int) -> list[Any]:
    """Every process `pid` started, however deep (torchrun puts its workers in sessions of
    their own); taken before a kill, since orphans leave the tree."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_process_tree(pid: int, tree: list[Any], sig: int) -> None:
    """Signal `pid`'s process group and `tree`, as a runtime signals a container's cgroup."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(sig)


def stop_process_tree(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group (torchrun passes it on to its workers), `grace` seconds,
    then SIGKILL to whatever of the tree is left: nothing of a stopped pod lives on."""
    if proc.poll() is not None:
        return
    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        signal_process_tree(proc.pid, tree, signal.SIGKILL)
        proc.wait(10)
    signal_process_tree(proc.pid, [c for c in tree if c.is_running()], signal.SIGKILL)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (Linux), so a
    test session killed hard leaves no server or pod process behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], log: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a test server or pod process with stdout and stderr appended to `log`: in a
    session of its own (so a stop reaches its children through the group), killed when the
    thread that started it dies, and reading nothing from the terminal."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent, **popen)


class S3ServerProcess:
    """What the S3 test servers (MinIO, SeaweedFS) share: readiness, buckets, a context manager, and
    being stopped at interpreter exit if a test forgot to. A subclass sets `_proc` and
    implements `start`, `stop`, `client` and `log_tail`."""

    program: ClassVar[str]
    ready_timeout_s: ClassVar[float]
    _proc: subprocess.Popen | None

    def _started(self) -> None:
        _SERVERS.add(self)

    def _stopped(self) -> None:
        _SERVERS.discard(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited with {self._proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                # Only our server knows our random root keys, so success proves the port is ours.
                self.client().list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"{self.program} not ready in {self.ready_timeout_s} s ({last}):\n"
                           f"{self.log_tail()}")

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().make_bucket(name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Empty the bucket, then remove it."""
        from minio.deleteobjects import DeleteObject

        client = self.client()
        doomed = [DeleteObject(o.object_name) for o in client.list_objects(name, recursive=True)]
        if doomed:
            list(client.remove_objects(name, doomed))
        client.remove_bucket(name)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_SERVERS):
        server.stop()


@pytest.fixture(autouse=True)
def no_leaked_processes():
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before
              and p.pid not in _KEPT and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in leaked:
        p.kill()
    assert not leaked, f"test left processes running: {[p.cmdline()[:3] for p in leaked]}"
