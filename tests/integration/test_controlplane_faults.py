"""Faults of the control plane itself, during one real run: the run continues, no Job is
created twice, nothing is lost.

One MeritRun (the S3 example, a few steps per partition) with the operator as the chart's
ServiceAccount, reaching the API server through `support.faultproxy` (a relay that passes
its token through, so the server still authenticates and authorizes every request). While
the partitions train: kube-apiserver is stopped and started again, then etcd; the first
watches the operator re-opens are answered with `410 Gone` and its next two status patches
with `409 Conflict`. Job creations are counted from the API server's audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from support.faultproxy import FaultProxy
from support.kube import KubeCluster, OperatorProcess, wait_until
from support.kube_e2e import apply, node_options, render_example, stage_inputs, wait_phase

pytestmark = pytest.mark.slow
RUN = "steady"
RUN_PATHS = r"/apis/merit\.run/v1alpha1/namespaces/[^/]+/meritruns"


@dataclass
class Outcome:
    status: dict[str, Any]
    phase_at_restart: str
    creations: dict[str, int]
    hits: dict[str, int]
    status_patches_after_conflict: int
    events: list[dict[str, Any]]
    log: str
    alive: bool


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, control_plane, seaweed, tiny_base, tiny_mixture) -> Outcome:
    tmp = tmp_path_factory.mktemp("cp-faults")
    staged = stage_inputs(seaweed, tiny_base, tiny_mixture)
    bucket, creds = staged.bucket, staged.creds
    cluster = KubeCluster(control_plane, tmp, prefix="cpfaults").start()
    proxy = FaultProxy(control_plane.url, control_plane.ca_pem).start()
    token = control_plane.service_account_token(cluster.namespace, cluster.service_account)
    kubeconfig = tmp / "operator-via-proxy.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
        "clusters": [{"name": "proxy", "cluster": {"server": proxy.url}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "operator",
                                                   "namespace": cluster.namespace}}]}))
    operator = OperatorProcess(cluster, env={**creds, "MERITRUN_KUBECONFIG": str(kubeconfig)})
    try:
        cluster.start_node(node_options())
        cluster.create_secret("meritrun-storage", creds)
        operator.start()
        apply(cluster, render_example(bucket=bucket, endpoint=seaweed.endpoint, name=RUN,
                                      changes={"training.maxSteps": 8}))
        wait_until(lambda: cluster.get("batch/v1/jobs", f"{RUN}-p0-a1"), timeout=180,
                   what="the partition Jobs")
        phase_at_restart = cluster.run_status(RUN).get("phase", "")
        # Armed first: the watches the operator re-opens after the restart get the 410.
        proxy.arm("watch-410", "GET", RUN_PATHS + "$", watch=True)
        proxy.arm("watch-410-jobs", "GET", r"/apis/batch/v1/(namespaces/[^/]+/)?jobs$",
                  watch=True)
        proxy.arm("status-409", "PATCH", RUN_PATHS + "/[^/]+/status$", times=2)
        control_plane.restart_apiserver(down_seconds=2)
        control_plane.restart_etcd(down_seconds=2)
        status = wait_phase(cluster, RUN, ("Succeeded", "Failed"), timeout=300)
        patches = control_plane.audit(user=cluster.operator_user, verb="patch",
                                      resource="meritruns", subresource="status", code=200)
        return Outcome(status=status, phase_at_restart=phase_at_restart,
                       creations=cluster.created("jobs"), hits=dict(proxy.hits),
                       status_patches_after_conflict=len(patches),
                       events=cluster.events_once(RUN, "Succeeded"),
                       log=operator.log(),
                       alive=operator.proc is not None and operator.proc.poll() is None)
    finally:
        operator.stop()
        proxy.stop()
        cluster.stop()
        seaweed.remove_bucket(bucket)


def test_the_run_survives_and_succeeds(outcome):
    assert outcome.phase_at_restart in ("Profiling", "Training")
    st = outcome.status
    assert st["phase"] == "Succeeded", st.get("message")
    assert [p["state"] for p in st["partitions"]] == ["Succeeded", "Succeeded"]
    assert all(p["artifact"]["bytes"] > 0 for p in st["partitions"])
    assert st["modelUri"] and outcome.alive


def test_no_job_was_created_twice(outcome):
    assert outcome.creations.keys() >= {f"{RUN}-profile-a1", f"{RUN}-p0-a1", f"{RUN}-p1-a1",
                                        f"{RUN}-merge-a1"}
    duplicated = {name: n for name, n in outcome.creations.items() if n != 1}
    assert not duplicated, f"Jobs created more than once: {duplicated}"


def test_the_injected_410_and_409_were_served_and_survived(outcome):
    assert outcome.hits["status-409"] == 2
    assert outcome.hits["watch-410"] + outcome.hits["watch-410-jobs"] >= 1
    assert outcome.status_patches_after_conflict > 0


def test_nothing_was_lost(outcome):
    reasons = [e["reason"] for e in outcome.events
               if e["involvedObject"]["name"] == RUN]
    assert "Succeeded" in reasons
    assert "Traceback" not in outcome.log, outcome.log[-3000:]
