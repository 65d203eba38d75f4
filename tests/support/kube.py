"""Test support: a namespace of the real control plane, kubectl, and the operator as a process.

`KubeCluster` is one fresh namespace on the session's control plane
(`support.controlplane`) with the chart's ServiceAccount and RBAC installed in it (rendered by
`helm template` for a namespaced install watching that namespace, applied for real), so the
operator authenticates with that ServiceAccount's token and the API server enforces the
chart's rules. Stopping it deletes what it installed and the namespace, and waits until the
node has no process left there. Fixtures: `kube_cluster` (fresh per test), `operator_factory`
(operator processes, stopped and checked for logged exceptions).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .apiclient import ApiStatus, resource_path
from .controlplane import ControlPlane, free_port
from .helm import Helm
from .kubelet import NodeOptions
from .processes import spawn

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meritrun"
CRD_PATH = REPO / "crds" / "meritrun.yaml"  # the chart renders this same CRD
RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
REMOTE_SA = "meritrun-remote"  # what a remote site's kubeconfig authenticates as
REMOTE_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]

__all__ = ["CRD_PATH", "REPO", "KubeCluster", "OperatorProcess", "free_port", "wait_until"]


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


def install_crd(plane: ControlPlane, path: Path = CRD_PATH) -> None:
    """Apply the chart's CRD (server-side, so a CRD helm owns can be updated) and wait until
    it is Established."""
    crd = yaml.safe_load(path.read_text())
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  f"crd/{crd['metadata']['name']}")


class KubeCluster:
    """A fresh namespace with the chart's operator identity; `namespace` is its name."""

    def __init__(self, plane: ControlPlane, workdir: Path, *, prefix: str = "t",
                 values: tuple[str, ...] = (), rbac: bool = True) -> None:
        """rbac=False: neither the CRD nor the chart's RBAC (a `helm install` brings both)."""
        self.plane, self.workdir, self.prefix, self.values = plane, workdir, prefix, values
        self.rbac = rbac
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespace = ""
        self.rbac_docs: list[dict[str, Any]] = []
        self.service_account = ""

    def start(self) -> KubeCluster:
        self.namespace = self.plane.create_namespace(self.prefix)
        if not self.rbac:
            return self
        install_crd(self.plane)
        release = f"mr-{self.namespace}"
        out = Helm(self.workdir / "helm-home").run(
            "template", release, str(CHART), "--namespace", self.namespace,
            "--set", f"watchNamespaces={{{self.namespace}}}", *self.values).stdout
        self.rbac_docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] in RBAC_KINDS]
        self.service_account = next(d["metadata"]["name"] for d in self.rbac_docs
                                    if d["kind"] == "ServiceAccount")
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(self.rbac_docs))
        return self

    def start_node(self, options: NodeOptions | None = None) -> None:
        """How the node treats this namespace's pods (failure injection, no running)."""
        assert self.plane.node is not None
        self.plane.node.configure(self.namespace, options or NodeOptions())

    def stop(self) -> None:
        if not self.namespace:
            return
        cluster_scoped = [d for d in self.rbac_docs if d["kind"].startswith("Cluster")]
        if cluster_scoped:
            self.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                         stdin=yaml.safe_dump_all(cluster_scoped), check=False)
        self._release_runs()
        self.plane.delete_namespace(self.namespace)

    def _release_runs(self) -> None:
        """Drop the finalizers of runs left behind: their operator is gone, and the namespace
        would otherwise wait for it forever."""
        runs = resource_path("merit.run/v1alpha1/meritruns", self.namespace)
        try:
            names = [o["metadata"]["name"] for o in self.plane.api.list(runs)]
        except ApiStatus:
            return  # no CRD installed
        for name in names:
            try:
                self.plane.api.merge_patch(f"{runs}/{name}", {"metadata": {"finalizers": None}})
            except ApiStatus as e:
                if e.code != 404:
                    raise

    # --- identities ------------------------------------------------------------------------

    @property
    def operator_user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def kubeconfig(self, user: str = "admin") -> Path:
        """"admin", or "operator" (the chart's ServiceAccount, a TokenRequest token)."""
        path = self.workdir / f"kubeconfig-{user}.yaml"
        if user == "admin":
            return self.plane.kubeconfig(path, namespace=self.namespace)
        assert user == "operator", user
        token = self.plane.service_account_token(self.namespace, self.service_account)
        return self.plane.kubeconfig(path, token=token, namespace=self.namespace, user=user)

    def remote_kubeconfig(self) -> str:
        """A kubeconfig for this namespace as a remote site's operator uses it: its own
        ServiceAccount, bound to a Role with what remote Jobs need."""
        ns = self.namespace
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": REMOTE_SA}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": REMOTE_SA}, "rules": REMOTE_RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": REMOTE_SA},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": REMOTE_SA},
             "subjects": [{"kind": "ServiceAccount", "name": REMOTE_SA, "namespace": ns}]}]))
        token = self.plane.service_account_token(ns, REMOTE_SA)
        path = self.plane.kubeconfig(self.workdir / "kubeconfig-remote.yaml", token=token,
                                     namespace=ns, user=REMOTE_SA)
        return path.read_text()

    # --- reading ---------------------------------------------------------------------------

    def objects(self, resource: str) -> list[dict[str, Any]]:
        return self.plane.api.list(resource_path(resource, self.namespace))

    def events_once(self, name: str, reason: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The namespace's events, once `name` has one with `reason` (or after timeout s, for
        the test to report): the operator posts a round's events after its status commit, so
        a phase can be read before the event that announces it."""
        def seen() -> list[dict[str, Any]]:
            events = self.objects("v1/events")
            return events if any(e["involvedObject"]["name"] == name and e["reason"] == reason
                                 for e in events) else []
        try:
            return wait_until(seen, timeout=timeout, what=f"{name}'s {reason} event")
        except AssertionError:
            return self.objects("v1/events")

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return self.plane.api.get_or_none(resource_path(resource, self.namespace, name))

    def run_status(self, name: str) -> dict[str, Any]:
        obj = self.get("merit.run/v1alpha1/meritruns", name)
        return (obj or {}).get("status") or {}

    def created(self, resource: str) -> dict[str, int]:
        """How many times each name was created (plural, e.g. "jobs"), from the audit log."""
        return self.plane.created(resource.rsplit("/", 1)[-1], self.namespace)

    def requests(self, user: str | None = None) -> list[dict[str, Any]]:
        """Audit events of a user (default: the operator) in any namespace or none."""
        return self.plane.audit(user=user or self.operator_user)

    # --- writing ---------------------------------------------------------------------------

    def create_secret(self, name: str, values: dict[str, str]) -> None:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        try:
            self.plane.api.create(f"/api/v1/namespaces/{self.namespace}/secrets", {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                "data": data})
        except ApiStatus as e:
            if e.code != 409:
                raise

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60.0,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, namespace=self.namespace or "default", check=check,
                                  timeout=timeout, stdin=stdin)


class OperatorProcess:
    """`python -m merit_operator` as the chart's ServiceAccount, logging to a file."""

    def __init__(self, cluster: KubeCluster, *, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.metrics_port = free_port()
        self.log_path = cluster.workdir / f"operator-{time.monotonic_ns()}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))},
            "MERITRUN_NAMESPACES": cluster.namespace,
            "MERITRUN_METRICS_PORT": str(self.metrics_port),
            "MERITRUN_METRICS_ADDRESS": "127.0.0.1", "MERITRUN_HEALTH_PORT": "0",
            "MERITRUN_RESYNC_SECONDS": "2", "MERITRUN_BACKOFF_BASE_SECONDS": "1",
            "MERITRUN_BACKOFF_MAX_SECONDS": "4", "MERITRUN_ERROR_BACKOFF_SECONDS": "0.5",
            "MERITRUN_ERROR_BACKOFF_MAX_SECONDS": "5", "MERITRUN_JOB_PYTHON": "python",
            **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_timeout: float = 60.0) -> OperatorProcess:
        if "MERITRUN_KUBECONFIG" not in self.env:
            self.env["MERITRUN_KUBECONFIG"] = str(self.cluster.kubeconfig("operator"))
        self.proc = spawn([sys.executable, "-m", "merit_operator"], self.log_path, env=self.env)
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
def kube_cluster(control_plane: ControlPlane, tmp_path: Path) -> Iterator[KubeCluster]:
    cluster = KubeCluster(control_plane, tmp_path).start()
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
