"""The test control plane itself: real kube-apiserver, etcd and Job controller, and the node
stand-in running pods as local processes. Quick (no model is trained); every operator test
relies on what is checked here.
"""

from __future__ import annotations

import pytest
from support.apiclient import Api, ApiStatus
from support.kube import KubeCluster, wait_until
from support.kubelet import NODE_NAME


def job(name: str, code: str, **pod: object) -> dict:
    container = {"name": "main", "image": "python:3", "command": ["python", "-c", code],
                 "terminationMessagePolicy": "FallbackToLogsOnError", **pod.pop("c", {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", "containers": [container], **pod}}}}


def job_condition(cluster: KubeCluster, name: str) -> str | None:
    status = (cluster.get("batch/v1/jobs", name) or {}).get("status") or {}
    done = [c["type"] for c in status.get("conditions") or []
            if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
    return done[0] if done else None


def pods_of(cluster: KubeCluster, job_name: str) -> list[dict]:
    return cluster.plane.api.list(f"/api/v1/namespaces/{cluster.namespace}/pods",
                                  labels=f"job-name={job_name}")


def create(cluster: KubeCluster, body: dict) -> None:
    cluster.plane.api.create(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs", body)


def test_the_server_is_real_and_enforces_rbac(control_plane):
    version = control_plane.api.get("/version")
    assert version["major"] == "1" and version["gitVersion"].startswith("v1.3")
    node = control_plane.api.get(f"/api/v1/nodes/{NODE_NAME}")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    nobody = Api(control_plane.url, token="not-a-token", ca_pem=control_plane.ca_pem)
    with pytest.raises(ApiStatus) as denied:
        nobody.list("/api/v1/namespaces/default/pods")
    assert denied.value.code == 401


def test_jobs_run_as_processes_and_the_job_controller_writes_their_status(kube_cluster):
    c = kube_cluster
    c.create_secret("creds", {"TOKEN": "s3cret"})
    c.plane.api.create(f"/api/v1/namespaces/{c.namespace}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "params"},
        "data": {"params.json": '{"x": 1}'}})
    ok = ("import json, os, sys; assert os.environ['TOKEN'] == 's3cret', os.environ; "
          "assert json.load(open(sys.argv[1]))['x'] == 1; print('fine')")
    create(c, job("ok", ok, c={
        "args": ["/etc/params/params.json"],
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds",
                                                                 "key": "TOKEN"}}}],
        "volumeMounts": [{"name": "params", "mountPath": "/etc/params"}]},
        volumes=[{"name": "params", "configMap": {"name": "params"}}]))
    create(c, job("bad", "import sys; print('MERITRUN_ERROR: boom'); sys.exit(3)"))
    create(c, job("sleeper", "import time; time.sleep(600)"))
    wait_until(lambda: job_condition(c, "ok") and job_condition(c, "bad"), timeout=60,
               what="the Job controller to finish both Jobs")
    assert job_condition(c, "ok") == "Complete"
    assert job_condition(c, "bad") == "Failed"
    (pod,) = pods_of(c, "bad")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert "MERITRUN_ERROR: boom" in terminated["message"]
    # Deleting a running Job's pod (as the garbage collector does) kills its process.
    wait_until(lambda: "sleeper" in " ".join(c.plane.node.running(c.namespace)), timeout=30,
               what="the sleeper to run")
    c.kubectl("delete", "job", "sleeper", "--cascade=foreground", "--wait=true")
    wait_until(lambda: not c.plane.node.running(c.namespace), timeout=30,
               what="the sleeper's process to be killed")


def test_stuck_pods_say_why(kube_cluster):
    c = kube_cluster
    create(c, job("unpullable", "pass", c={"image": "example.invalid/does-not-exist:1"}))
    create(c, job("no-secret", "pass", c={"env": [{"name": "X", "valueFrom": {
        "secretKeyRef": {"name": "missing", "key": "X"}}}]}))
    create(c, job("no-node", "pass", nodeSelector={"gpu": "h100"}))

    def reasons() -> dict[str, str]:
        out = {}
        for name in ("unpullable", "no-secret", "no-node"):
            for pod in pods_of(c, name):
                st = pod.get("status") or {}
                for cs in st.get("containerStatuses") or []:
                    out[name] = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
                for cond in st.get("conditions") or []:
                    if cond["type"] == "PodScheduled" and cond["status"] == "False":
                        out[name] = cond.get("reason")
        return out if len(out) == 3 else {}

    assert wait_until(reasons, timeout=60, what="three stuck pods") == {
        "unpullable": "ImagePullBackOff", "no-secret": "CreateContainerConfigError",
        "no-node": "Unschedulable"}


def test_a_namespace_is_cleaned_up_with_its_processes(control_plane, tmp_path):
    cluster = KubeCluster(control_plane, tmp_path).start()
    create(cluster, job("sleeper", "import time; time.sleep(600)"))
    wait_until(lambda: control_plane.node.running(cluster.namespace), timeout=30,
               what="the pod to run")
    cluster.stop()
    assert control_plane.node.running(cluster.namespace) == []
