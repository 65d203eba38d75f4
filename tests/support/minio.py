"""Test support: a real MinIO server (`minio server`, built by scripts/kube-bins.sh).

Why MinIO besides SeaweedFS: it is what most clusters run, its policy engine and admin API
are its own (service accounts with inline policies and expirations), and grants are issued
through that API (`meritrun.minio_issuer`). One process on 127.0.0.1 with a random root
user, so keys are enforced and readiness proves the port is ours. The binary is
`$MERITRUN_MINIO`, else ~/.cache/meritrun/bin/minio; without it the fixture fails and says how
to build it (no silent skip).

Fixtures: `minio` (session server), `minio_bucket` (fresh bucket per test, an S3Bucket like
seaweed's). `MinioServer` has the same surface as `SeaweedServer` (endpoint, keys, client,
make_bucket, remove_bucket), so a test can run on either.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .processes import S3ServerProcess, spawn, stop_process
from .seaweed import S3Bucket

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def find_minio() -> str:
    found = os.environ.get("MERITRUN_MINIO") or str(
        Path(os.environ.get("MERITRUN_CACHE", Path.home() / ".cache" / "meritrun"))
        / "bin" / "minio")
    if not Path(found).is_file():
        raise RuntimeError(f"MinIO server not found at {found}: run scripts/kube-bins.sh minio "
                           "(or set MERITRUN_MINIO)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class MinioServer(S3ServerProcess):
    """One `minio server` process on loopback; `start()`/`stop()` or a context manager."""

    program: ClassVar[str] = "minio"
    ready_timeout_s: ClassVar[float] = READY_TIMEOUT_S

    access_key: str = field(default_factory=lambda: f"root{uuid.uuid4().hex[:12]}")
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        import urllib3
        from minio import Minio

        return Minio(f"127.0.0.1:{self.port}", access_key or self.access_key,
                     secret_key or self.secret_key, secure=False, region="us-east-1",
                     http_client=urllib3.PoolManager(retries=False, timeout=10.0))

    def admin(self) -> Any:
        """MinIO's admin API client with the root keys."""
        import urllib3
        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        return MinioAdmin(endpoint=f"127.0.0.1:{self.port}", secure=False,
                          credentials=StaticProvider(self.access_key, self.secret_key),
                          http_client=urllib3.PoolManager(retries=False, timeout=10.0))

    def start(self) -> MinioServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="minio-")
        work = Path(self._tmp.name)
        for attempt in range(3):  # a port taken between choosing and binding
            self.port = _free_port()
            console = _free_port()
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AWS_", "MINIO_"))}
            env.update(MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
                       MINIO_BROWSER="off", MINIO_UPDATE="off", GOMEMLIMIT="512MiB",
                       MINIO_CI_CD="1", HOME=str(work))
            self._proc = spawn(
                [find_minio(), "server", str(work / "data"), "--quiet",
                 "--address", f"127.0.0.1:{self.port}",
                 "--console-address", f"127.0.0.1:{console}"],
                work / "minio.log", env=env)
            self._started()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                self._kill()
                if attempt == 2:
                    raise
        return self

    def log_tail(self, chars: int = 3000) -> str:
        log = Path(self._tmp.name) / "minio.log" if self._tmp else None
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_GRACE_S)
        self._stopped()

    def stop(self) -> None:
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@pytest.fixture(scope="session")
def minio() -> Iterator[MinioServer]:
    with MinioServer() as server:
        yield server


@pytest.fixture
def minio_bucket(minio: MinioServer) -> Iterator[S3Bucket]:
    name = minio.make_bucket()
    yield S3Bucket(name, minio)  # type: ignore[arg-type]
    try:
        minio.remove_bucket(name)
    except Exception:  # noqa: BLE001 - the server goes away with the session anyway
        pass
