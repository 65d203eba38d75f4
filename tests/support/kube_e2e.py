"""The end-to-end run shared by the e2e, RBAC and Prometheus tests (session fixture `e2e_run`).

One real run is expensive (every stage imports torch), so it happens once: the chart's CRD
served by the emulator, the operator as a process, a real Prometheus scraping it, the
example `examples/meritrun-s3.yaml` applied with kubectl (endpoint and bucket pointed at the
test's SeaweedFS), the node running the real stage entry points, the run to Succeeded, then
`kubectl delete` through the finalizer. Everything observed is kept in an `E2EResult`; the
fixture stops all it started before the tests look at it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kube import REPO, KubeCluster, OperatorProcess, wait_until
from .kube_emulator import Recorded
from .kube_node import NodeOptions
from .prometheus import PrometheusServer

EXAMPLE = REPO / "examples" / "meritrun-s3.yaml"
RUN_TIMEOUT_S = 180.0
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


def node_options(**kwargs: Any) -> NodeOptions:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "KUBECONFIG", "MERITRUN_"))}
    # Two stage processes share two cores: one thread each, as a CPU limit of 1 would give.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return NodeOptions(env=env, **kwargs)


def apply(cluster: KubeCluster, doc: dict[str, Any]) -> None:
    # --validate=false: the emulator serves no OpenAPI documents for kubectl's validation.
    cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(doc))


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
    job_creations: dict[str, int]
    events: list[dict[str, Any]]
    exposition: str
    promql_runs: list[dict[str, Any]]
    promql_histogram: list[dict[str, Any]]
    operator_requests: list[Recorded]
    left_after_delete: list[str]
    operator_log: str


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory, seaweed: Any, tiny_base: Path,
            tiny_mixture: Any) -> Iterator[E2EResult]:
    from meritrun.storage import open_storage

    tmp = tmp_path_factory.mktemp("e2e")
    bucket = seaweed.make_bucket()
    storage = open_storage(f"s3://{bucket}", endpoint=seaweed.endpoint,
                           access_key=seaweed.access_key, secret_key=seaweed.secret_key)
    upload_inputs(storage, tiny_base, tiny_mixture)
    creds = {"AWS_ACCESS_KEY_ID": seaweed.access_key,
             "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    cluster = KubeCluster(tmp).start()
    operator = OperatorProcess(cluster, env=creds)
    prometheus = PrometheusServer(tmp, [f"127.0.0.1:{operator.metrics_port}"])
    try:
        cluster.start_node(node_options())
        cluster.create_secret("meritrun-storage", creds)
        prometheus.start()
        operator.start()
        doc = render_example(bucket=bucket, endpoint=seaweed.endpoint)
        name = doc["metadata"]["name"]
        apply(cluster, doc)
        status = wait_phase(cluster, name, ("Succeeded", "Failed"))
        jobs = cluster.objects("batch/v1/jobs")
        result = E2EResult(
            run=name, status=status,
            kubectl_get=cluster.kubectl("get", "meritruns").stdout,
            kubectl_wide=cluster.kubectl("get", "mr", "-o", "wide").stdout,
            model_dir=tmp / "model", jobs=jobs, job_creations={}, events=[],
            exposition="", promql_runs=[], promql_histogram=[], operator_requests=[],
            left_after_delete=[], operator_log="")
        if status["phase"] == "Succeeded":
            _, key = status["modelUri"].split(f"s3://{bucket}/", 1)
            storage.download_dir(key, result.model_dir)
            result.promql_runs = prometheus.wait_for(
                PROMQL_RUNS, accept=lambda r: float(r[0]["value"][1]) == 1.0)
            result.promql_histogram = prometheus.wait_for(
                PROMQL_HISTOGRAM, accept=lambda r: float(r[0]["value"][1]) > 0)
        result.exposition = operator.metrics_text()
        cluster.kubectl("delete", "meritrun", name, "--wait=false")
        wait_until(lambda: cluster.get("merit.run/v1alpha1/meritruns", name) is None,
                   timeout=30, what="the finalizer to release the run")
        result.left_after_delete = [o["metadata"]["name"] for r in (
            "batch/v1/jobs", "v1/configmaps") for o in cluster.objects(r)]
        result.job_creations = cluster.created("batch/v1/jobs")
        result.events = cluster.objects("v1/events")
        result.operator_requests = cluster.recorded("operator")
        operator.stop()
        result.operator_log = operator.log()
    finally:
        operator.stop()
        prometheus.stop()
        cluster.stop()
        seaweed.remove_bucket(bucket)
    yield result
