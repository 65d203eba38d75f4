"""Test support: Kueue's real manager against the test control plane, with no webhooks.

Kueue's manager normally serves admission webhooks (with certificates it makes and injects,
"internal cert management"). Here nothing calls them: the test cluster gets Kueue's CRDs but
no Validating/MutatingWebhookConfiguration, so the API server never calls a webhook, and the
operator creates its Jobs suspended with the queue label itself (what the mutating webhook
would add). What remains is the part under test: the Job integration turns each queued Job
into a Workload, the scheduler admits it within the ClusterQueue's quota and unsuspends it.

Why not internal cert management: it injects its CA into webhook configurations and CRD
conversion settings that do not exist here and waits for that to succeed. With it off, the
manager still starts its webhook server and a metrics certificate watcher, so both get
certificates made here: the webhook server's in a temporary `certDir`, the metrics one at the
path Kueue hard-codes (/etc/kueue/metrics/certs), bind-mounted from a temporary folder in a
private mount namespace (`unshare -m`), so nothing is written there but an empty mount point.
The metrics server itself is off (`bindAddress: "0"`), and so is the visibility API server
(feature gate VisibilityOnDemand). Leader election is off; health probes on a free loopback
port tell when it is ready.

Binary and CRDs: `scripts/kube-bins.sh kueue` (`~/.cache/meritrun/bin/kueue`, `kueue-crds/`).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .processes import spawn

METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # hard-coded in Kueue's main.go
KUEUE_API = "kueue.x-k8s.io/v1beta2"
READY_TIMEOUT_S = 90.0


def kueue_paths() -> tuple[Path, Path]:
    bin_dir = Path(os.environ.get("MERITRUN_KUBE_BIN",
                                  Path.home() / ".cache" / "meritrun" / "bin"))
    binary, crds = bin_dir / "kueue", bin_dir / "kueue-crds"
    if not binary.exists() or not crds.is_dir():
        raise RuntimeError(f"{binary} or {crds} is missing: build them with "
                           "scripts/kube-bins.sh kueue")
    return binary, crds.resolve()  # kubectl -f reads a symlink to a folder as a file


def self_signed(folder: Path, name: str = "localhost") -> Path:
    """tls.crt and tls.key for a loopback server nobody verifies (webhook and metrics)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder


def manager_config(*, health_port: int, webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


class KueueManager:
    """Kueue's CRDs applied, its manager running; `stop()` ends it."""

    def __init__(self, plane: Any, workdir: Path) -> None:
        self.plane, self.workdir = plane, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = 0

    def start(self) -> KueueManager:
        from .controlplane import free_port

        binary, crds = kueue_paths()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Server-side apply: Kueue's CRDs are too large for kubectl's last-applied annotation.
        self.plane.kubectl("apply", "--server-side", "-f", str(crds))
        self.plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                           "-f", str(crds))
        self.plane.kubectl("create", "namespace", "kueue-system", check=False)
        self.health_port = free_port()
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(manager_config(
            health_port=self.health_port, webhook_port=free_port(),
            cert_dir=self_signed(self.workdir / "webhook-certs"))))
        metrics_certs = self_signed(self.workdir / "metrics-certs")
        kubeconfig = self.plane.kubeconfig(self.workdir / "kubeconfig")
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)  # the (empty) mount point
        script = (f'mount --bind "{metrics_certs}" "{METRICS_CERT_DIR}" && '
                  f'exec "{binary}" --config "{config}" --zap-log-level=info')
        self.proc = spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          self.workdir / "kueue.log",
                          env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kueue exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"kueue not ready in {READY_TIMEOUT_S:.0f} s:\n{self.log()}")

    def log(self, chars: int = 4000) -> str:
        path = self.workdir / "kueue.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def gpu_queue(namespace: str, *, gpus: int, name: str = "gpu") -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue with `gpus` nvidia.com/gpu (and ample CPU and memory)
    for this namespace, and its LocalQueue `name`."""
    flavor, cluster_queue = f"{namespace}-flavor", f"{namespace}-cq"
    return [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
         "spec": {
             "namespaceSelector": {"matchLabels": {
                 "kubernetes.io/metadata.name": namespace}},
             "resourceGroups": [{
                 "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                 "flavors": [{"name": flavor, "resources": [
                     {"name": "cpu", "nominalQuota": "64"},
                     {"name": "memory", "nominalQuota": "256Gi"},
                     {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)}]}]}]}},
        {"apiVersion": KUEUE_API, "kind": "LocalQueue",
         "metadata": {"name": name, "namespace": namespace},
         "spec": {"clusterQueue": cluster_queue}},
    ]
