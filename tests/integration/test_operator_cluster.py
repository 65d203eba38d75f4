"""What a real control plane shows, fixed: held and stuck Jobs say why, one of two operators
acts (a Lease), a rotated token keeps working, a rolled-back operator reads a newer status.

All on the session's real kube-apiserver, Job controller and node stand-in; the operators are
real processes authenticated as the chart's ServiceAccount (namespaced RBAC, enforced by the
API server). Pods whose stage would need the data never get that far here: the runs are held
(queue), stuck (image, Secret, node selector) or left pending, so no model is trained.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml
from support.kube import CRD_PATH, KubeCluster, OperatorProcess, install_crd, wait_until
from support.kube_e2e import apply, node_options, render_example

LEASE = "meritrun-operator"
LEASE_ENV = {"MERITRUN_LEADER_ELECTION": "true", "MERITRUN_LEASE_DURATION_SECONDS": "4",
             "MERITRUN_LEASE_RENEW_DEADLINE_SECONDS": "3",
             "MERITRUN_LEASE_RETRY_PERIOD_SECONDS": "0.5"}
TIMEOUT_S = 90.0


@pytest.fixture
def creds(seaweed) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}


@pytest.fixture
def bucket(seaweed):
    name = seaweed.make_bucket()
    yield name
    seaweed.remove_bucket(name)


def run_doc(seaweed, bucket: str, name: str, **changes: Any) -> dict[str, Any]:
    return render_example(bucket=bucket, endpoint=seaweed.endpoint, name=name, changes=changes)


def events(cluster: KubeCluster, run: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.objects("v1/events")
            if e["involvedObject"]["name"] == run and e.get("reason") == reason]


def delete_runs(cluster: KubeCluster) -> None:
    """Through the finalizer, while an operator still runs (else the namespace cannot go)."""
    cluster.kubectl("delete", "meritruns", "--all", "--timeout=90s", check=False)


def waiting(cluster: KubeCluster, run: str) -> str:
    return ((cluster.run_status(run).get("profile") or {}).get("waiting")) or ""


def test_held_and_stuck_jobs_say_why(kube_cluster, seaweed, bucket, creds):
    cluster = kube_cluster
    cluster.start_node(node_options())
    cluster.create_secret("meritrun-storage", creds)
    operator = OperatorProcess(cluster, env=creds).start()
    try:
        runs = {
            "queued": run_doc(seaweed, bucket, "queued", **{"template.queueName": "nowhere"}),
            "no-image": run_doc(seaweed, bucket, "no-image",
                                **{"template.image": "registry.invalid/does-not-exist:1"}),
            "no-secret": run_doc(seaweed, bucket, "no-secret",
                                 **{"storage.secretRef": {"name": "not-created"}}),
            "no-node": run_doc(seaweed, bucket, "no-node",
                               **{"template.nodeSelector": {"pool": "none"}}),
        }
        for doc in runs.values():
            apply(cluster, doc)
        expected = {"queued": "Suspended: not admitted by queue 'nowhere'",
                    "no-image": "ImagePullBackOff", "no-secret": "CreateContainerConfigError",
                    "no-node": "Unschedulable"}
        for run, prefix in expected.items():
            wait_until(lambda r=run, p=prefix: waiting(cluster, r).startswith(p),
                       timeout=TIMEOUT_S, what=f"{run}'s waiting reason {prefix}")
            assert cluster.run_status(run)["phase"] == "Profiling"  # held, not failed
            assert wait_until(lambda r=run: events(cluster, r, "JobWaiting"), timeout=30,
                              what=f"a JobWaiting event on {run}")
        # The reason moves with the Job: once the Secret exists the pod starts.
        cluster.create_secret("not-created", creds)
        wait_until(lambda: not waiting(cluster, "no-secret"), timeout=TIMEOUT_S,
                   what="no-secret's waiting reason to clear")
        # A namespaced install: the operator never asked for anything cluster-scoped.
        cluster_scoped = [e["uri"] for e in cluster.requests() if not e["namespace"]]
        assert not cluster_scoped, cluster_scoped[:5]
        assert not [e for e in cluster.requests() if e["code"] == 403]
        operator.assert_no_exceptions()
    finally:
        delete_runs(cluster)
        operator.stop()


def _standby(cluster: KubeCluster, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """An operator process that is expected to wait (no metrics endpoint to wait for)."""
    proc_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))},
                "MERITRUN_NAMESPACES": cluster.namespace, "MERITRUN_METRICS_PORT": "0",
                "MERITRUN_HEALTH_PORT": "0", "MERITRUN_RESYNC_SECONDS": "2",
                "MERITRUN_KUBECONFIG": str(cluster.kubeconfig("operator")), **env}
    log = (cluster.workdir / "standby.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "merit_operator"], env=proc_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def lease_holder(cluster: KubeCluster) -> str:
    lease = cluster.plane.api.get_or_none(
        f"/apis/coordination.k8s.io/v1/namespaces/{cluster.namespace}/leases/{LEASE}")
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or ""


def test_of_two_operators_only_the_lease_holder_acts(kube_cluster, seaweed, bucket, creds):
    cluster = kube_cluster
    cluster.start_node(node_options(run=False))  # pods stay pending: only operators act
    cluster.create_secret("meritrun-storage", creds)
    env = {**creds, **LEASE_ENV, "MERITRUN_LEASE_NAMESPACE": cluster.namespace}
    first = OperatorProcess(cluster, env={**env, "POD_NAME": "op-a"}).start()
    second = _standby(cluster, {**env, "POD_NAME": "op-b"})
    try:
        assert lease_holder(cluster).startswith("op-a_")
        apply(cluster, run_doc(seaweed, bucket, "before"))
        wait_until(lambda: cluster.get("batch/v1/jobs", "before-profile-a1"), timeout=TIMEOUT_S,
                   what="the leader's first Job")
        log = cluster.workdir / "standby.log"
        wait_until(lambda: "waits" in log.read_text(), timeout=30, what="the follower to wait")
        time.sleep(3)  # the follower had every chance to act
        assert "kopf" not in log.read_text().lower(), log.read_text()[-2000:]
        first.kill()  # SIGKILL: no release, the follower waits out the lease duration
        wait_until(lambda: lease_holder(cluster).startswith("op-b_"), timeout=30,
                   what="the follower to take the Lease")
        apply(cluster, run_doc(seaweed, bucket, "after"))
        wait_until(lambda: cluster.get("batch/v1/jobs", "after-profile-a1"), timeout=TIMEOUT_S,
                   what="the new leader's first Job")
        created = cluster.created("jobs")
        assert created == {"before-profile-a1": 1, "after-profile-a1": 1}, created
        lease = cluster.plane.api.get(f"/apis/coordination.k8s.io/v1/namespaces/"
                                      f"{cluster.namespace}/leases/{LEASE}")
        assert lease["spec"]["leaseTransitions"] == 1
        delete_runs(cluster)
        # A clean stop releases the Lease at once.
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        wait_until(lambda: lease_holder(cluster) == "", timeout=10, what="the Lease released")
    finally:
        first.stop()
        if second.poll() is None:
            second.kill()
            second.wait(10)
    assert "Traceback" not in (cluster.workdir / "standby.log").read_text()


def _bound_token(cluster: KubeCluster, secret: str) -> str:
    """A ServiceAccount token bound to a Secret: deleting the Secret revokes the token."""
    api, ns = cluster.plane.api, cluster.namespace
    obj = api.create(f"/api/v1/namespaces/{ns}/secrets",
                     {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}})
    review = api.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts/{cluster.service_account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "expirationSeconds": 3600, "boundObjectRef": {
                "kind": "Secret", "apiVersion": "v1", "name": secret,
                "uid": obj["metadata"]["uid"]}}})
    return review["status"]["token"]


def test_a_rotated_token_file_keeps_the_operator_working(kube_cluster, seaweed, bucket, creds):
    cluster = kube_cluster
    cluster.start_node(node_options(run=False))
    cluster.create_secret("meritrun-storage", creds)
    token_file = cluster.workdir / "token"
    token_file.write_text(_bound_token(cluster, "token-one"))
    kubeconfig = yaml.safe_load(cluster.kubeconfig("operator").read_text())
    for user in kubeconfig["users"]:
        user["user"].pop("token", None)
        user["user"]["tokenFile"] = str(token_file)
    path = cluster.workdir / "kubeconfig-tokenfile.yaml"
    path.write_text(yaml.safe_dump(kubeconfig))
    operator = OperatorProcess(cluster, env={
        **creds, "MERITRUN_KUBECONFIG": str(path), "MERITRUN_TOKEN_REREAD_SECONDS": "1"}).start()
    try:
        apply(cluster, run_doc(seaweed, bucket, "one"))
        wait_until(lambda: cluster.get("batch/v1/jobs", "one-profile-a1"), timeout=TIMEOUT_S,
                   what="a Job with the first token")
        token_file.write_text(_bound_token(cluster, "token-two"))  # the kubelet's rotation
        time.sleep(3)  # both the REST client and kopf's next login read the file again
        cluster.kubectl("delete", "secret", "token-one")  # the first token is now refused
        apply(cluster, run_doc(seaweed, bucket, "two"))
        wait_until(lambda: cluster.get("batch/v1/jobs", "two-profile-a1"), timeout=TIMEOUT_S,
                   what="a Job with the rotated token")
        wait_until(lambda: "merit.run/finalizer" in (cluster.get(  # kopf's own patch
            "merit.run/v1alpha1/meritruns", "two")["metadata"].get("finalizers") or []),
            timeout=60, what="kopf's finalizer with the rotated token")
        operator.assert_no_exceptions()
    finally:
        delete_runs(cluster)
        operator.stop()


def test_an_older_operator_reads_a_status_written_by_a_newer_one(kube_cluster, seaweed, bucket,
                                                                creds):
    cluster = kube_cluster
    cluster.start_node(node_options(run=False))
    cluster.create_secret("meritrun-storage", creds)
    crd = yaml.safe_load(CRD_PATH.read_text())
    newer = copy.deepcopy(crd)
    status = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    status["properties"]["fromTheFuture"] = {"type": "string"}
    status["properties"]["profile"]["properties"]["newerField"] = {"type": "integer"}
    newer_path = cluster.workdir / "newer-crd.yaml"
    newer_path.write_text(yaml.safe_dump(newer))
    install_crd(cluster.plane, newer_path)  # the CRD the chart upgraded; the operator is older
    operator = None
    try:
        apply(cluster, run_doc(seaweed, bucket, "rolled-back"))
        cluster.kubectl("patch", "meritrun", "rolled-back", "--subresource=status",
                        "--type=merge", "-p", yaml.safe_dump({"status": {
                            "phase": "Pending", "fromTheFuture": "kept",
                            "profile": {"state": "Pending", "attempt": 0, "newerField": 3}}}))
        operator = OperatorProcess(cluster, env=creds).start()
        wait_until(lambda: cluster.get("batch/v1/jobs", "rolled-back-profile-a1"),
                   timeout=TIMEOUT_S, what="the run to proceed")
        # The round writes the status after its Jobs exist: wait for that write.
        wait_until(lambda: cluster.run_status("rolled-back").get("phase") != "Pending",
                   timeout=TIMEOUT_S, what="the round's status")
        status = cluster.run_status("rolled-back")
        assert status["phase"] == "Profiling" and status["fromTheFuture"] == "kept"
        operator.assert_no_exceptions()
    finally:
        if operator is not None:
            delete_runs(cluster)
            operator.stop()
        install_crd(cluster.plane)
