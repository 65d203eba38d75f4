"""The end-to-end run shared by the e2e, RBAC and Prometheus tests (session fixture `e2e_run`).

One real run is expensive (every stage imports torch), so it happens once, in a fresh
namespace of the session's control plane (real kube-apiserver, etcd, Job controller):
`helm install` of charts/meritrun (CRD, RBAC, Deployment; the operator pod is run by the node
stand-in, authenticated with the chart's ServiceAccount token), a real Prometheus scraping
it, the example `examples/meritrun-s3.yaml` applied with kubectl (endpoint and bucket pointed
at the test's SeaweedFS), `kubectl wait --for=condition=Ready`, the stage pods running the
real entry points, then `kubectl delete` through the finalizer; then `helm upgrade` with a
changed CRD, `kubectl explain`, and `helm uninstall`. Everything observed is kept in an
`E2EResult` (the operator's requests from the API server's audit log); the fixture stops all
it started before the tests look.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helm import CHART, Helm
from .kube import REPO, KubeCluster, free_port, install_crd, wait_until
from .kubelet import NodeOptions
from .prometheus import PrometheusServer

EXAMPLE = REPO / "examples" / "meritrun-s3.yaml"
RUN_TIMEOUT_S = 400.0
PROMQL_RUNS = 'meritrun_runs{phase="Succeeded"}'
PROMQL_HISTOGRAM = "sum(meritrun_reconcile_duration_seconds_count)"


def render_example(*, bucket: str, endpoint: str, name: str | None = None,
                   changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The example MeritRun with its storage pointed at a test bucket (and spec changes)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    text = yaml.safe_dump(doc).replace("s3://meritrun/", f"s3://{bucket}/")
    doc = yaml.safe_load(text)
    doc["spec"]["storage"].update(endpoint=endpoint, bucket=bucket)
    if name:
        doc["metadata"]["name"] = name
    for path, value in (changes or {}).items():
        node = doc["spec"]
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return doc


def upload_inputs(storage: Any, tiny_base: Path, mixture: Any) -> None:
    """The base model and the data at the keys the example names."""
    storage.upload_dir(tiny_base, "models/tiny-base")
    storage.put_file("data/train.jsonl", mixture.train)
    storage.put_file("data/held_out.jsonl", mixture.held_out)


@dataclass(frozen=True)
class StagedInputs:
    """A fresh bucket holding the example's inputs, and the credentials pods use for it."""
    bucket: str
    storage: Any
    creds: dict[str, str]


def stage_inputs(seaweed: Any, tiny_base: Path, mixture: Any) -> StagedInputs:
    """A new bucket on the test's S3 server with the base and data the example names."""
    from meritrun.storage import open_storage

    bucket = seaweed.make_bucket()
    storage = open_storage(f"s3://{bucket}", endpoint=seaweed.endpoint,
                           access_key=seaweed.access_key, secret_key=seaweed.secret_key)
    upload_inputs(storage, tiny_base, mixture)
    creds = {"AWS_ACCESS_KEY_ID": seaweed.access_key,
             "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    return StagedInputs(bucket, storage, creds)


def node_options(**kwargs: Any) -> NodeOptions:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "KUBECONFIG", "MERITRUN_"))}
    # Two stage processes share two cores: one thread each, as a CPU limit of 1 would give.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return NodeOptions(env=env, **kwargs)


def apply(cluster: KubeCluster, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))


def wait_phase(cluster: KubeCluster, name: str, phases: tuple[str, ...], *,
               timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = cluster.run_status(name)
        return status if status.get("phase") in phases else None
    try:
        return wait_until(done, timeout=timeout, interval=0.5, what=f"run {name} in {phases}")
    except AssertionError as e:
        raise AssertionError(f"{e}; status: {cluster.run_status(name)}") from e


@dataclass
class E2EResult:
    run: str
    status: dict[str, Any]
    kubectl_get: str
    kubectl_wide: str
    model_dir: Path
    jobs: list[dict[str, Any]]
    job_creations: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    exposition: str = ""
    promql_runs: list[dict[str, Any]] = field(default_factory=list)
    promql_histogram: list[dict[str, Any]] = field(default_factory=list)
    operator_requests: list[dict[str, Any]] = field(default_factory=list)
    operator_user: str = ""
    left_after_delete: list[str] = field(default_factory=list)
    pods_left_after_gc: list[str] = field(default_factory=list)
    operator_log: str = ""
    chart: dict[str, Any] = field(default_factory=dict)  # what helm and kubectl showed


RELEASE = "mr"
UPGRADE_COLUMN = {"name": "Upgraded", "type": "string", "jsonPath": ".status.phase",
                  "priority": 1, "description": "added by the upgrade test"}


def changed_chart(tmp: Path) -> Path:
    """A copy of the chart whose CRD (wherever the chart keeps it) has one more printer column."""
    copy = tmp / "chart-upgrade"
    shutil.copytree(CHART, copy)
    for path in copy.rglob("*.yaml"):
        text = path.read_text()
        if "kind: CustomResourceDefinition" in text and "additionalPrinterColumns:" in text:
            column = yaml.safe_dump([UPGRADE_COLUMN], default_flow_style=True).strip()[1:-1]
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if line.strip() == "additionalPrinterColumns:":
                    indent = line[:len(line) - len(line.lstrip())]
                    lines.insert(i + 1, f"{indent}- {column}")
                    break
            path.write_text("\n".join(lines) + "\n")
    return copy


def adopt_crd(plane: Any, release: str, namespace: str) -> bool:
    """Let the release adopt a CRD an earlier test applied (helm refuses to take over an
    object without its ownership metadata); True if there was one to adopt. kubectl's
    server-side apply still owns its fields, so the first `helm upgrade` after an adoption
    needs --force-conflicts, as docs/quickstart-cluster.md tells users."""
    crd = "crd/meritruns.merit.run"
    if plane.kubectl("get", crd, check=False).returncode != 0:
        return False
    plane.kubectl("label", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    plane.kubectl("annotate", crd, f"meta.helm.sh/release-name={release}",
                  f"meta.helm.sh/release-namespace={namespace}", "--overwrite")
    return True


def chart_values(cluster: KubeCluster, metrics_port: int) -> list[str]:
    return ["--namespace", cluster.namespace,
            "--set", f"watchNamespaces={{{cluster.namespace}}}",
            "--set", f"metrics.port={metrics_port}", "--set", f"health.port={free_port()}",
            "--set", "operator.resyncSeconds=2", "--set", "operator.backoffBaseSeconds=1",
            "--set", "operator.backoffMaxSeconds=4",
            # One replica: pods on the node stand-in share 127.0.0.1, so a second replica's
            # health port would clash (on a real node each pod has its own address).
            "--set", "operator.replicas=1"]


def operator_pod_log(cluster: KubeCluster) -> str:
    node = cluster.plane.node
    assert node is not None
    return "".join(node.log(cluster.namespace, p["metadata"]["name"])
                   for p in cluster.plane.api.list(
                       f"/api/v1/namespaces/{cluster.namespace}/pods",
                       labels="app.kubernetes.io/component=operator"))


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory, control_plane: Any, seaweed: Any,
            tiny_base: Path, tiny_mixture: Any) -> Iterator[E2EResult]:
    tmp = tmp_path_factory.mktemp("e2e")
    staged = stage_inputs(seaweed, tiny_base, tiny_mixture)
    bucket, storage, creds = staged.bucket, staged.storage, staged.creds
    cluster = KubeCluster(control_plane, tmp, prefix="e2e", rbac=False).start()
    helm = Helm(tmp / "helm-home", kubeconfig=cluster.kubeconfig("admin"))
    metrics_port = free_port()
    values = chart_values(cluster, metrics_port)
    prometheus = PrometheusServer(tmp, [f"127.0.0.1:{metrics_port}"])
    installed = False
    try:
        cluster.start_node(node_options())
        cluster.create_secret("meritrun-storage", creds)
        prometheus.start()
        chart: dict[str, Any] = {}
        adopted = adopt_crd(control_plane, RELEASE, cluster.namespace)
        chart["install"] = helm.run("install", RELEASE, str(CHART), *values, "--wait",
                                    "--timeout", "180s", timeout=240).stdout
        installed = True
        chart["pods_after_install"] = cluster.plane.node.running(cluster.namespace)
        doc = render_example(bucket=bucket, endpoint=seaweed.endpoint)
        name = doc["metadata"]["name"]
        apply(cluster, doc)
        chart["wait"] = cluster.kubectl("wait", "--for=condition=Ready", f"meritrun/{name}",
                                        f"--timeout={int(RUN_TIMEOUT_S)}s", check=False,
                                        timeout=RUN_TIMEOUT_S + 30)
        status = wait_phase(cluster, name, ("Succeeded", "Failed"), timeout=30)
        result = E2EResult(
            run=name, status=status,
            kubectl_get=cluster.kubectl("get", "meritruns").stdout,
            kubectl_wide=cluster.kubectl("get", "mr", "-o", "wide").stdout,
            model_dir=tmp / "model", jobs=cluster.objects("batch/v1/jobs"),
            operator_user=f"system:serviceaccount:{cluster.namespace}:{RELEASE}-meritrun",
            chart=chart)
        if status["phase"] == "Succeeded":
            _, key = status["modelUri"].split(f"s3://{bucket}/", 1)
            storage.download_dir(key, result.model_dir)
            result.promql_runs = prometheus.wait_for(
                PROMQL_RUNS, accept=lambda r: float(r[0]["value"][1]) == 1.0)
            result.promql_histogram = prometheus.wait_for(
                PROMQL_HISTOGRAM, accept=lambda r: float(r[0]["value"][1]) > 0)
        result.exposition = _metrics(metrics_port)
        cluster.kubectl("delete", "meritrun", name, "--wait=false")
        wait_until(lambda: cluster.get("merit.run/v1alpha1/meritruns", name) is None,
                   timeout=30, what="the finalizer to release the run")
        result.left_after_delete = _labelled(cluster, "batch/v1/jobs", "v1/configmaps")
        # The operator deletes Jobs with Background propagation: their pods go afterwards, by
        # the garbage collector, as on any cluster. Give it time, then look.
        try:
            wait_until(lambda: not _labelled(cluster, "v1/pods"), timeout=60,
                       what="the garbage collector to delete the run's pods")
        except AssertionError:
            pass
        result.pods_left_after_gc = _labelled(cluster, "v1/pods")
        result.job_creations = cluster.created("jobs")
        result.events = cluster.objects("v1/events")
        result.operator_requests = cluster.plane.audit(user=result.operator_user)
        result.operator_log = operator_pod_log(cluster)
        take_over = ["--force-conflicts"] if adopted else []
        chart["upgrade"] = helm.run("upgrade", RELEASE, str(changed_chart(tmp)), *values,
                                    *take_over, "--wait", "--timeout", "180s",
                                    timeout=240).stdout
        chart["crd_after_upgrade"] = cluster.plane.api.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/meritruns.merit.run")
        chart["explain"] = cluster.kubectl("explain", "meritrun.spec.training").stdout
        chart["uninstall"] = helm.run("uninstall", RELEASE, "--namespace", cluster.namespace,
                                      "--wait", "--timeout", "120s", timeout=180).stdout
        installed = False
        # `--wait` waits for the Deployment; its pod goes afterwards (the garbage collector,
        # then the node stops it), as on any cluster. Give it time, then look.
        try:
            wait_until(lambda: not cluster.plane.node.running(cluster.namespace), timeout=60,
                       what="the node to stop the operator pod")
        except AssertionError:
            pass
        chart["left_after_uninstall"] = {
            "deployments": [d["metadata"]["name"] for d in cluster.objects(
                "apps/v1/deployments")],
            "running": cluster.plane.node.running(cluster.namespace),
            "crd": cluster.plane.api.get_or_none(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/meritruns.merit.run")
            is not None}
    finally:
        if installed:
            helm.run("uninstall", RELEASE, "--namespace", cluster.namespace, check=False)
        prometheus.stop()
        cluster.stop()
        install_crd(control_plane)  # the session's other tests expect the chart's own CRD
        seaweed.remove_bucket(bucket)
    yield result


def _labelled(cluster: KubeCluster, *resources: str) -> list[str]:
    """Names of the objects of these resources that carry a MeritRun's run label."""
    return [o["metadata"]["name"] for r in resources for o in cluster.objects(r)
            if "merit.run/run" in (o["metadata"].get("labels") or {})]


def _metrics(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""
