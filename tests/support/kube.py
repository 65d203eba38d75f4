"""Test support: an emulated Kubernetes cluster (kmock + our fixes), its node, kubectl, and
the operator as a real process.

`KubeCluster` runs the emulator and the node in an event loop on a background thread, so
tests stay synchronous: kubectl and the operator are real processes talking HTTP to it, and
every wait is bounded. Users are bearer tokens ("admin" for kubectl, "operator", "node"), so
the RBAC test can pick out the operator's requests. Stopping the cluster fails the test if
any asyncio task is still running. Fixtures: `kube_cluster` (fresh per test),
`operator_factory` (operator processes, stopped and checked for logged exceptions).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from .kube_emulator import Emulator
from .kube_node import Node, NodeOptions

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "meritrun.yaml"
TOKENS = {"admin-token": "admin", "operator-token": "operator", "node-token": "node"}
USERS = tuple(TOKENS.values())
NAMESPACE = "default"
CALL_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2,
               what: str = "condition") -> Any:
    """Poll until predicate() is truthy; its value, or AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class KubeCluster:
    """The emulated API server (and optionally its node) on a background event loop."""

    def __init__(self, workdir: Path, *, crd: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.crd = crd if crd is not None else yaml.safe_load(CRD_PATH.read_text())
        self.loop = asyncio.new_event_loop()
        self.emulator: Emulator | None = None
        self.node: Node | None = None
        self._node_task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="kube", daemon=True)
        self._servers: list[kmock.Server] = []
        self.urls: dict[str, str] = {}

    def start(self) -> KubeCluster:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.emulator = Emulator(tokens=dict(TOKENS))
        self.emulator.install_crd(self.crd)
        await self.emulator.__aenter__()
        for user in USERS:
            server = kmock.Server(self.emulator)
            await server.__aenter__()
            self._servers.append(server)
            self.emulator.ports[server.port] = user
            self.urls[user] = f"http://127.0.0.1:{server.port}"

    def call(self, coro: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_node(self, options: NodeOptions | None = None) -> Node:
        options = options or NodeOptions()
        if not options.env:
            options.env = {k: v for k, v in os.environ.items()
                           if not k.startswith(("AWS_", "KUBECONFIG", "MERITRUN_"))}
        (self.workdir / "node").mkdir(exist_ok=True)

        async def start() -> Node:
            assert self.emulator is not None
            node = Node(self.emulator, url=self.urls["node"], token="node-token",
                        workdir=self.workdir / "node", options=options)
            self._node_task = asyncio.create_task(node.run(), name="node")
            return node

        self.node = self.call(start())
        return self.node

    def stop(self) -> None:
        leftovers = self.call(self._stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        assert not leftovers, f"asyncio tasks left running: {leftovers}"

    async def _stop(self) -> list[str]:
        if self._node_task is not None:
            self._node_task.cancel()
            await asyncio.gather(self._node_task, return_exceptions=True)
        assert self.emulator is not None
        self.emulator.close()
        for server in reversed(self._servers):  # kmock's resolver hooks unwind as a stack
            await server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)
        await asyncio.sleep(0.1)
        me = asyncio.current_task()
        return [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]

    # --- reading the cluster (snapshots taken on the loop: no torn reads) ---------------

    def objects(self, resource: str, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            assert self.emulator is not None
            res = kmock.resource(resource)
            return [json.loads(json.dumps(o.raw))
                    for (r, ns, _), o in list(self.emulator.objects.items())
                    if r == res and not o.deleted and (namespace is None or ns == namespace)]
        return self.call(read())

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return next((o for o in self.objects(resource, namespace)
                     if o["metadata"]["name"] == name), None)

    def run_status(self, name: str) -> dict[str, Any]:
        obj = self.get("merit.run/v1alpha1/meritruns", name)
        return (obj or {}).get("status") or {}

    def created(self, resource: str) -> dict[str, int]:
        """How many times each name was created (successful POSTs), from object histories."""
        async def read() -> dict[str, int]:
            assert self.emulator is not None
            res = kmock.resource(resource)
            counts: dict[str, int] = {}
            for (r, _, name), obj in list(self.emulator.objects.items()):
                if r == res:
                    history = list(obj.history)
                    births = sum(1 for i, v in enumerate(history)
                                 if v is not None and (i == 0 or history[i - 1] is None))
                    counts[name] = births
            return counts
        return self.call(read())

    def recorded(self, user: str) -> list[Any]:
        async def read() -> list[Any]:
            assert self.emulator is not None
            return [r for r in self.emulator.recorded if r.user == user]
        return self.call(read())

    # --- clients ------------------------------------------------------------------------

    def kubeconfig(self, user: str) -> Path:
        token = next(t for t, u in TOKENS.items() if u == user)
        path = self.workdir / f"kubeconfig-{user}.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.urls[user]}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": user, "namespace": NAMESPACE}}]}))
        return path

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON object as admin (kubectl 1.37 sends built-in kinds as protobuf, which
        the emulator cannot read: Secrets are created this way)."""
        import urllib.request

        request = urllib.request.Request(
            self.urls["admin"] + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer admin-token"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def create_secret(self, name: str, values: dict[str, str]) -> None:
        import base64

        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        self.create(f"/api/v1/namespaces/{NAMESPACE}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data})

    def kubectl(self, *args: str, check: bool = True, timeout: float = 30.0,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
        cmd = [exe, "--kubeconfig", str(self.kubeconfig("admin")), "--cache-dir",
               str(self.workdir / "kubectl-cache"), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              input=stdin, env={**os.environ, "HOME": str(self.workdir)})
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done


class OperatorProcess:
    """`python -m merit_operator` against the emulator, logging to a file."""

    def __init__(self, cluster: KubeCluster, *, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.metrics_port = free_port()
        self.log_path = cluster.workdir / f"operator-{time.monotonic_ns()}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))},
            "MERITRUN_KUBECONFIG": str(cluster.kubeconfig("operator")),
            "MERITRUN_NAMESPACES": NAMESPACE, "MERITRUN_METRICS_PORT": str(self.metrics_port),
            "MERITRUN_METRICS_ADDRESS": "127.0.0.1", "MERITRUN_HEALTH_PORT": "0",
            "MERITRUN_RESYNC_SECONDS": "2", "MERITRUN_BACKOFF_BASE_SECONDS": "1",
            "MERITRUN_BACKOFF_MAX_SECONDS": "4", "MERITRUN_ERROR_BACKOFF_SECONDS": "0.5",
            "MERITRUN_ERROR_BACKOFF_MAX_SECONDS": "5", "MERITRUN_JOB_PYTHON": "python",
            **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_timeout: float = 30.0) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "merit_operator"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or self.metrics_text(),
                   timeout=ready_timeout, what="the operator's metrics endpoint")
        assert self.proc.poll() is None, f"operator exited:\n{self.log()[-3000:]}"
        return self

    def metrics_text(self) -> str:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as r:
                return r.read().decode()
        except OSError:
            return ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def assert_no_exceptions(self) -> None:
        text = self.log()
        assert "Traceback" not in text, f"the operator logged an exception:\n{text[-4000:]}"


@pytest.fixture
def kube_cluster(tmp_path: Path) -> Iterator[KubeCluster]:
    cluster = KubeCluster(tmp_path).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def operator_factory(kube_cluster: KubeCluster) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(env: dict[str, str] | None = None) -> OperatorProcess:
        proc = OperatorProcess(kube_cluster, env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        proc.assert_no_exceptions()


# Fixtures of the sibling modules, registered through this plugin (conftest lists only it).
from .helm import helm  # noqa: E402,F401
from .kube_e2e import e2e_run  # noqa: E402,F401
