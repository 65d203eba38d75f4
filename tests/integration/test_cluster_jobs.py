"""Stage Jobs and MeritRuns as the real API server and Job controller treat them.

- An evicted stage pod (a node drain) is replaced by the Job controller without failing the
  Job: the stage manifest's podFailurePolicy ignores DisruptionTarget.
- The operator's Job watch gets only Jobs with a run label: the server applies the selector.
- The chart's ValidatingAdmissionPolicy refuses MeritRuns with images or ServiceAccounts it
  does not allow, at admission, with its message.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import yaml
from support.helm import Helm
from support.kube import CHART, KubeCluster, wait_until
from support.kube_e2e import node_options, render_example

from merit_operator.jobwatch import JobWatch, job_watch_paths
from merit_operator.kubeapi import ApiConfig, KubeApi
from merit_operator.manifests import Images, RunRef, build_stage_job
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import RunId
from meritrun.jobs import train_job

SLEEPER = "import time; time.sleep(120)"


def stage_job(namespace: str, name: str = "evict") -> dict[str, Any]:
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": "s3://bkt/base"}, "data": {"uri": "s3://bkt/d.jsonl"},
        "storage": {"endpoint": "http://127.0.0.1:1", "bucket": "bkt"}})
    part = PartitionStatus(name="p0", index=0, sources=["a"])
    job = build_stage_job(train_job(RunId(name, "u-1"), spec, part, 1),
                          run=RunRef(name, namespace, "u-1"),
                          spec=spec, images=Images(trainer="t:1", merger="m:1"), owned=False)
    pod = job["spec"]["template"]["spec"]
    pod["containers"][0]["command"] = ["python", "-c", SLEEPER]
    pod["volumes"] = [v for v in pod["volumes"] if "configMap" not in v]
    pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"]
                                            if m["name"] != "params"]
    return job


def pods_of(cluster: KubeCluster, job: str) -> list[dict[str, Any]]:
    return [p for p in cluster.objects("v1/pods")
            if (p["metadata"].get("labels") or {}).get("job-name") == job]


def test_an_evicted_stage_pod_is_replaced_without_failing_the_job(kube_cluster):
    cluster = kube_cluster
    cluster.start_node(node_options())
    job = stage_job(cluster.namespace)
    name = job["metadata"]["name"]
    cluster.plane.api.create(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs", job)
    first = wait_until(lambda: [p for p in pods_of(cluster, name)
                                if (p.get("status") or {}).get("phase") == "Running"],
                       timeout=60, what="the stage pod running")[0]
    pod = first["metadata"]["name"]
    cluster.plane.api.create(
        f"/api/v1/namespaces/{cluster.namespace}/pods/{pod}/eviction",
        {"apiVersion": "policy/v1", "kind": "Eviction",
         "metadata": {"name": pod, "namespace": cluster.namespace}})
    second = wait_until(lambda: [p for p in pods_of(cluster, name)
                                 if p["metadata"]["name"] != pod
                                 and (p.get("status") or {}).get("phase") == "Running"],
                        timeout=60, what="a replacement pod running")
    assert second
    status = cluster.get("batch/v1/jobs", name)["status"]
    assert not [c for c in status.get("conditions") or [] if c["type"] == "Failed"]
    assert not status.get("failed"), status  # the eviction was not counted (backoffLimit 0)


def test_the_job_watch_sees_only_our_jobs(kube_cluster):
    cluster = kube_cluster
    cluster.start_node(node_options(run=False))
    config = ApiConfig.from_kubeconfig(cluster.kubeconfig("operator"))
    woken: list[tuple[str, str]] = []
    (path,) = job_watch_paths((cluster.namespace,))
    watch = JobWatch(KubeApi(config), path, lambda ns, run: woken.append((ns, run)),
                     timeout_seconds=30)
    stop = threading.Event()
    thread = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    thread.start()
    try:
        other = stage_job(cluster.namespace, "other")
        other["metadata"]["labels"] = {"team": "someone-else"}
        other["spec"]["template"]["metadata"]["labels"] = {"team": "someone-else"}
        api = cluster.plane.api
        api.create(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs", other)
        api.create(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs",
                   stage_job(cluster.namespace, "ours"))
        wait_until(lambda: (cluster.namespace, "ours") in woken, timeout=30,
                   what="the watch to wake run 'ours'")
        events_before = watch.events
        api.merge_patch(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs/other-p0-a1",
                        {"metadata": {"annotations": {"touched": "1"}}})
        api.merge_patch(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs/ours-p0-a1",
                        {"metadata": {"annotations": {"touched": "1"}}})
        wait_until(lambda: watch.events > events_before, timeout=30, what="the second event")
        assert {run for _, run in woken} == {"ours"}  # 'other' never reached the operator
    finally:
        stop.set()
        thread.join(40)


@pytest.fixture
def admission_policy(kube_cluster):
    out = Helm(kube_cluster.workdir / "helm-vap").run(
        "template", "vap", str(CHART), "--namespace", kube_cluster.namespace,
        "--set", "admissionPolicy.enabled=true",
        "--set", "admissionPolicy.allowedImagePrefixes={registry.example/ml/}",
        "--set", f"watchNamespaces={{{kube_cluster.namespace}}}").stdout
    docs = [d for d in yaml.safe_load_all(out)
            if d and d["kind"].startswith("ValidatingAdmissionPolicy")]
    text = yaml.safe_dump_all(docs)
    kube_cluster.kubectl("apply", "-f", "-", stdin=text)
    yield
    kube_cluster.kubectl("delete", "--ignore-not-found", "-f", "-", stdin=text, check=False)


def test_the_admission_policy_refuses_other_images(kube_cluster, admission_policy, seaweed):
    cluster = kube_cluster

    def try_apply(name: str, **changes: Any):
        doc = render_example(bucket="bkt", endpoint=seaweed.endpoint, name=name,
                             changes=changes)
        return cluster.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                               stdin=yaml.safe_dump(doc))

    refused = wait_until(  # the API server picks a new policy up within a second or two
        lambda: (lambda d: d if d.returncode else None)(
            try_apply("evil", **{"template.image": "docker.io/evil/miner:1"})),
        timeout=30, what="the policy to refuse an image")
    assert "spec.template.image docker.io/evil/miner:1 is not allowed" in refused.stderr
    sa = try_apply("sa", **{"template.serviceAccountName": "cluster-admin-ish"})
    assert sa.returncode and "serviceAccountName cluster-admin-ish" in sa.stderr
    ok = try_apply("fine", **{"template.image": "registry.example/ml/trainer:2"})
    assert ok.returncode == 0, ok.stderr
    plain = try_apply("plain")  # no image named: the chart's defaults
    assert plain.returncode == 0, plain.stderr
