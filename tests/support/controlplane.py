"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager.

The binaries come from `scripts/kube-bins.sh` (built from Go modules into
`~/.cache/meritrun/bin`, or `$MERITRUN_KUBE_BIN`). One control plane serves the whole test
session (fixture `control_plane`, started on first use, stopped at the end); tests isolate
themselves with namespaces. All on 127.0.0.1 with free ports:

- etcd with `--unsafe-no-fsync`;
- kube-apiserver on a secure port with RBAC authorization, bearer tokens from a token file
  (`admin` is in system:masters; so are the controller-manager and the node stand-in),
  service-account tokens signed by a key made here, a serving certificate whose SANs cover
  127.0.0.1, and an audit log (every request of every user but the controllers and the node,
  at Metadata level) that tests read to count creations and see who was refused;
- kube-controller-manager with the job, garbage-collector, ttl-after-finished,
  serviceaccount(-token), namespace, deployment, replicaset, root-CA, pod-GC and
  claim-protection controllers,
  `--leader-elect=false`;
- the node stand-in (`support.kubelet.Node`), which runs pods as local processes.

API for tests (kept small; other helpers build on it):
    plane.url, plane.ca_pem, plane.api (admin `support.apiclient.Api`), plane.node
    plane.kubeconfig(path, namespace=..., token=...)    a kubeconfig file (admin by default)
    plane.service_account_token(namespace, name)        a TokenRequest token (1 h)
    plane.create_namespace(prefix) / delete_namespace(name)
    plane.kubectl(*args, namespace=...)                 real kubectl as admin
    plane.audit(**match)                                parsed audit events
    plane.restart_apiserver() / restart_etcd()          for fault tests (same ports, data kept)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .apiclient import Api
from .kubelet import Node
from .pki import Pki, make_pki
from .processes import forget, keep, spawn, stop_process

BIN_DIR = Path(os.environ.get("MERITRUN_KUBE_BIN", Path.home() / ".cache" / "meritrun" / "bin"))
READY_TIMEOUT_S = 120.0
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
NODE_USER, KCM_USER = "meritrun-node", "system:kube-controller-manager"
CONTROLLERS = ("job-controller", "garbage-collector-controller", "ttl-after-finished-controller",
               "serviceaccount-controller", "serviceaccount-token-controller",
               "namespace-controller", "deployment-controller", "replicaset-controller",
               "root-ca-certificate-publisher-controller",
               # marks deleted pods that never reached a node Failed, so the Job controller
               # can drop its job-tracking finalizer (else a namespace with them never goes)
               "pod-garbage-collector-controller",
               # drops a deleted claim's protection finalizer once no pod uses it
               "persistentvolumeclaim-protection-controller")
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "None", "users": [NODE_USER, KCM_USER, "system:apiserver"]},
              {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
              {"level": "None", "nonResourceURLs": ["/*"]},
              {"level": "Metadata"}]}


def binary(name: str) -> str:
    path = BIN_DIR / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build it with scripts/kube-bins.sh "
                           "(scripts/setup.sh --dev does)")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One server process, logging to a file, exempt from the per-test leak check."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.proc = spawn(self.argv, self.log_path)
        keep(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, grace)
        forget(self.proc.pid)

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


class ControlPlane:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki: Pki = make_pki(workdir / "pki")
        self.ca_pem = self.pki.ca_cert.read_text()
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.node_token = "node-" + uuid.uuid4().hex
        self.audit_log = workdir / "audit.log"
        self.api = Api(self.url, token=ADMIN_TOKEN, ca_pem=self.ca_pem)
        self.procs: dict[str, Proc] = {}
        self.node: Node | None = None
        self._write_config()

    def _write_config(self) -> None:
        kcm_token = "kcm-" + uuid.uuid4().hex
        (self.workdir / "tokens.csv").write_text(
            f'{ADMIN_TOKEN},admin,admin,"system:masters"\n'
            f'{self.node_token},{NODE_USER},node,"system:masters"\n'
            f'{kcm_token},{KCM_USER},kcm,"system:masters"\n')
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        self.kubeconfig(self.workdir / "kcm.kubeconfig", token=kcm_token)

    # --- processes ------------------------------------------------------------------------

    def _etcd(self) -> Proc:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        return Proc("etcd", [
            binary("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--unsafe-no-fsync", "--log-level=warn",
            "--quota-backend-bytes=2147483648"], self.workdir / "etcd.log")

    def _apiserver(self) -> Proc:
        p = self.pki
        return Proc("kube-apiserver", [
            binary("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}", f"--cert-dir={self.workdir / 'certs'}",
            f"--tls-cert-file={p.server_cert}", f"--tls-private-key-file={p.server_key}",
            f"--client-ca-file={p.ca_cert}", f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-mode=blocking", "--profiling=false",
            "--enable-priority-and-fairness=false", "--endpoint-reconciler-type=none",
            "--v=0"], self.workdir / "kube-apiserver.log")

    def _controller_manager(self) -> Proc:
        return Proc("kube-controller-manager", [
            binary("kube-controller-manager"),
            f"--kubeconfig={self.workdir / 'kcm.kubeconfig'}",
            f"--controllers={','.join(CONTROLLERS)}", "--leader-elect=false",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_cert}", "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}", "--kube-api-qps=200", "--kube-api-burst=400",
            "--concurrent-job-syncs=10", "--profiling=false", "--v=0"],
            self.workdir / "kube-controller-manager.log")

    def start(self) -> ControlPlane:
        self.procs["etcd"] = self._etcd().start()
        self.procs["kube-apiserver"] = self._apiserver().start()
        self.wait_ready()
        self.procs["kube-controller-manager"] = self._controller_manager().start()
        self._wait(lambda: self.api.get_or_none(
            "/api/v1/namespaces/default/serviceaccounts/default"), "the default ServiceAccount")
        self.node = Node(self, token=self.node_token).start()
        return self

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                self.procs[name].stop()

    def _wait(self, predicate, what: str, timeout: float = READY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs.values():
                if proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n"
                                       f"{proc.tail()}")
            last: Exception | None = None
            try:
                value = predicate()
                if value:
                    return value
            except Exception as e:  # not up yet (connection refused, 5xx, 404)
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} ({last})")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        self._wait(lambda: self.api.request("GET", "/readyz", timeout=5) == "ok",
                   "kube-apiserver /readyz", timeout)

    def restart_apiserver(self, *, down_seconds: float = 1.0) -> None:
        """Stop kube-apiserver (SIGTERM), wait, start it again on the same port."""
        self.procs["kube-apiserver"].stop()
        time.sleep(down_seconds)
        self.procs["kube-apiserver"] = self._apiserver().start()
        self.wait_ready()

    def restart_etcd(self, *, down_seconds: float = 1.0) -> None:
        """Stop etcd (data kept), wait, start it again; the apiserver reconnects."""
        self.procs["etcd"].stop()
        time.sleep(down_seconds)
        self.procs["etcd"] = self._etcd().start()
        self.wait_ready()

    # --- clients ---------------------------------------------------------------------------

    def kubeconfig(self, path: Path, *, token: str = ADMIN_TOKEN, namespace: str = "default",
                   user: str = "user") -> Path:
        import base64

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca_pem.encode()).decode()}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {
                "cluster": "test", "user": user, "namespace": namespace}}]}))
        path.chmod(0o600)
        return path

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 3600,
                              bound_pod: dict[str, Any] | None = None) -> str:
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if bound_pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": bound_pod["metadata"]["name"],
                                      "uid": bound_pod["metadata"]["uid"]}
        done = self.api.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return done["status"]["token"]

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": name}})
        self._wait(lambda: self.api.get_or_none(
            f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            f"the default ServiceAccount of {name}", 60)
        return name

    def delete_namespace(self, name: str, *, wait: bool = True, timeout: float = 120) -> None:
        """Delete a namespace; with wait, until its pods' processes are gone and it is gone."""
        self.api.delete(f"/api/v1/namespaces/{name}")
        if wait:
            self._wait(lambda: self.api.get_or_none(f"/api/v1/namespaces/{name}") is None
                       and (self.node is None or not self.node.running(name)),
                       f"namespace {name} to go", timeout)

    def kubectl(self, *args: str, namespace: str = "default", check: bool = True,
                timeout: float = 60.0, stdin: str | None = None,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
        config = kubeconfig or self.kubeconfig(self.workdir / f"admin-{namespace}.kubeconfig",
                                               namespace=namespace)
        done = subprocess.run(
            [exe, "--kubeconfig", str(config), "--cache-dir", str(self.workdir / "kube-cache"),
             *args], capture_output=True, text=True, timeout=timeout, input=stdin,
            env={**os.environ, "HOME": str(self.workdir)})
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done

    def audit(self, **match: Any) -> list[dict[str, Any]]:
        """Audit events (ResponseComplete, or ResponseStarted of a watch) whose flattened
        fields equal `match`: keys are user, verb, resource, subresource, namespace, name,
        code; each also has its `uri` and when the server answered (`done`, RFC 3339)."""
        out = []
        if not self.audit_log.exists():
            return out
        for line in self.audit_log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            stage = event.get("stage")
            if stage != "ResponseComplete" and not (
                    stage == "ResponseStarted" and event.get("verb") == "watch"):
                continue  # a watch still open has only started
            ref = event.get("objectRef") or {}
            flat = {"user": event["user"].get("username"), "verb": event.get("verb"),
                    "resource": ref.get("resource"), "subresource": ref.get("subresource"),
                    "namespace": ref.get("namespace"), "name": ref.get("name"),
                    "code": (event.get("responseStatus") or {}).get("code")}
            if all(flat.get(k) == v for k, v in match.items()):
                out.append({**flat, "uri": event.get("requestURI", ""),
                            "done": event.get("stageTimestamp", "")})
        return out

    def created(self, resource: str, namespace: str) -> dict[str, int]:
        """How many times each name of a resource (plural) was created, from the audit log."""
        counts: dict[str, int] = {}
        for e in self.audit(verb="create", resource=resource, namespace=namespace, code=201):
            if not e["subresource"]:
                counts[e["name"]] = counts.get(e["name"], 0) + 1
        return counts


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane (started by the first test that needs it)."""
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    try:
        plane.start()
    except BaseException:
        plane.stop()
        raise
    try:
        yield plane
    finally:
        plane.stop()
