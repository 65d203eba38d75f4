"""The chart's RBAC, enforced by the real API server.

In the end-to-end run (fixture `e2e_run`) the operator authenticated with the chart's
ServiceAccount token, bound by the chart's own Role and ClusterRole (a namespaced install
watching the run's namespace); the API server's audit log holds every request it made and
the answer. Here: the server refused none of them, they cover what the operator does, and
the same identity is refused what the chart does not grant (Secrets unless remote or pull
sites are enabled, other namespaces, replacing a MeritRun).
"""

from __future__ import annotations

import pytest
from support.apiclient import Api, ApiStatus
from support.kube import KubeCluster

pytestmark = pytest.mark.slow


def test_the_server_refused_no_operator_request(e2e_run):
    assert e2e_run.operator_requests, "the audit log holds no request of the operator"
    assert {r["user"] for r in e2e_run.operator_requests} == {e2e_run.operator_user}
    refused = sorted({(r["verb"], r["resource"], r["subresource"], r["code"])
                      for r in e2e_run.operator_requests if r["code"] in (401, 403)}, key=str)
    assert not refused, f"the API server refused the operator: {refused}"


def test_the_requests_cover_what_the_operator_does(e2e_run):
    seen = {(r["verb"], r["resource"], r["subresource"] or "")
            for r in e2e_run.operator_requests if r["code"] < 400}
    for needed in [("create", "jobs", ""), ("create", "configmaps", ""),
                   ("patch", "meritruns", "status"), ("patch", "meritruns", ""),
                   ("watch", "meritruns", ""), ("watch", "jobs", ""), ("create", "events", ""),
                   ("delete", "jobs", ""), ("list", "pods", "")]:
        assert needed in seen, f"the e2e run made no successful {needed} request"


def test_a_namespaced_operator_makes_no_cluster_scoped_request(e2e_run):
    # The e2e operator serves one namespace: no namespaces or CRDs watched, Jobs watched
    # there with a label selector, so the namespaced chart needs no cluster-scoped RBAC.
    cluster_wide = sorted({(r["verb"], r["resource"]) for r in e2e_run.operator_requests
                           if r["namespace"] is None}, key=str)
    assert not cluster_wide


def test_the_job_watch_is_filtered_by_the_server(e2e_run):
    jobs = [r for r in e2e_run.operator_requests
            if r["resource"] == "jobs" and r["verb"] in ("list", "watch")]
    assert any(r["verb"] == "watch" for r in jobs), "the operator never watched Jobs"
    unfiltered = [r["uri"] for r in jobs if "labelSelector=merit.run%2Frun" not in r["uri"]]
    assert not unfiltered, unfiltered[:3]  # every list and watch of Jobs: ours only


def as_operator(cluster: KubeCluster) -> Api:
    plane = cluster.plane
    token = plane.service_account_token(cluster.namespace, cluster.service_account)
    return Api(plane.url, token=token, ca_pem=plane.ca_pem)


def refused(call) -> int:
    with pytest.raises(ApiStatus) as info:
        call()
    return info.value.code


def test_the_server_denies_what_the_chart_does_not_grant(control_plane, tmp_path):
    cluster = KubeCluster(control_plane, tmp_path / "plain").start()
    try:
        api, ns = as_operator(cluster), cluster.namespace
        assert api.list(f"/apis/batch/v1/namespaces/{ns}/jobs") == []  # granted
        assert refused(lambda: api.list(f"/api/v1/namespaces/{ns}/secrets")) == 403
        assert refused(lambda: api.list("/apis/batch/v1/namespaces/kube-system/jobs")) == 403
        assert refused(lambda: api.request(
            "PUT", f"/apis/merit.run/v1alpha1/namespaces/{ns}/meritruns/x",
            {"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun",
             "metadata": {"name": "x"}, "spec": {}})) == 403
    finally:
        cluster.stop()


def test_remote_sites_grant_reading_secrets_in_the_watched_namespace(control_plane, tmp_path):
    cluster = KubeCluster(control_plane, tmp_path / "remote",
                          values=("--set", "remoteSites.enabled=true")).start()
    try:
        api, ns = as_operator(cluster), cluster.namespace
        cluster.create_secret("east-kubeconfig", {"kubeconfig": "x"})
        assert api.get(f"/api/v1/namespaces/{ns}/secrets/east-kubeconfig")["data"]
        assert refused(lambda: api.create(f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "y"}})) == 403
    finally:
        cluster.stop()
