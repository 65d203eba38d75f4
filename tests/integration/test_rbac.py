"""Every request the operator made in the end-to-end run is allowed by the chart's RBAC.

The emulator recorded each request with its user (method, path, query). Each becomes the
attributes the API server's authorizer sees (verb, API group, resource, subresource,
namespace), and is checked against the rules bound to the operator's ServiceAccount in
`helm template` output, rendered both for the namespaced install the test ran and for the
default cluster-wide one. Discovery paths are granted to every user by the cluster's own
`system:discovery` role, as on a real cluster.
"""

from __future__ import annotations

import pytest
from support.rbac import Attributes, allowed, bound_rules, rendered, request_attributes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def operator_attributes(e2e_run) -> list[Attributes]:
    attrs = [request_attributes(r.method, r.path, r.query) for r in e2e_run.operator_requests]
    return [a for a in attrs if a is not None]


@pytest.mark.parametrize("values", [["--set", "watchNamespaces={default}"], []],
                         ids=["namespaced", "cluster-wide"])
def test_every_operator_request_is_allowed(helm, operator_attributes, values):
    rules = bound_rules(rendered(helm, *values))
    denied = sorted({a for a in operator_attributes if not allowed(a, rules)},
                    key=lambda a: (a.resource, a.verb))
    assert not denied, f"requests the chart's RBAC would deny: {denied}"


def test_the_recording_covers_what_the_operator_does(operator_attributes):
    seen = {(a.verb, a.resource, a.subresource) for a in operator_attributes}
    for needed in [("create", "jobs", ""), ("create", "configmaps", ""),
                   ("patch", "meritruns", "status"), ("patch", "meritruns", ""),
                   ("watch", "meritruns", ""), ("watch", "jobs", ""), ("create", "events", ""),
                   ("delete", "jobs", ""), ("list", "pods", "")]:
        assert needed in seen, f"the e2e run made no {needed} request"


def test_a_namespaced_operator_makes_no_cluster_scoped_request(operator_attributes):
    # The e2e operator serves one namespace: no namespaces or CRDs watched, Jobs watched
    # there with a label selector, so the namespaced chart needs no cluster-scoped RBAC.
    assert not sorted({a for a in operator_attributes if a.namespace is None},
                      key=lambda a: (a.resource, a.verb))


def test_the_checker_denies_what_is_not_granted(helm):
    rules = bound_rules(rendered(helm, "--set", "watchNamespaces={default}"))
    secret = Attributes("get", "", "secrets", "", "default")
    assert not allowed(secret, rules)
    assert not allowed(Attributes("create", "batch", "jobs", "", "kube-system"), rules)
    assert not allowed(Attributes("update", "merit.run", "meritruns", "", "default"), rules)
    remote = bound_rules(rendered(helm, "--set", "remoteSites.enabled=true"))
    assert allowed(secret, remote)


def test_request_attributes_mapping():
    assert request_attributes("GET", "/apis/batch/v1/namespaces/ns/jobs", {}) == Attributes(
        "list", "batch", "jobs", "", "ns")
    assert request_attributes(
        "PATCH", "/apis/merit.run/v1alpha1/namespaces/ns/meritruns/r/status", {}) == Attributes(
        "patch", "merit.run", "meritruns", "status", "ns")
    assert request_attributes("GET", "/api/v1/namespaces", {"watch": "true"}) == Attributes(
        "watch", "", "namespaces", "", None)
    assert request_attributes("GET", "/apis/merit.run/v1alpha1", {}) is None


def test_the_job_watch_is_filtered_by_the_server(e2e_run):
    jobs = [r for r in e2e_run.operator_requests
            if r.method == "GET" and r.path.endswith("/jobs")]
    watches = [r for r in jobs if str(r.query.get("watch")).lower() in ("true", "1")]
    assert watches, "the operator never watched Jobs"
    unfiltered = [r.query for r in jobs
                  if not str(r.query.get("labelSelector", "")).startswith("merit.run/run")]
    assert not unfiltered, unfiltered[:3]  # every list and watch of Jobs: ours only
    assert all(r.query.get("labelSelector") == "merit.run/run" for r in watches)
