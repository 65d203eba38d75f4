"""Every request the operator made in the end-to-end run is allowed by the chart's RBAC.

The emulator recorded each request with its user (method, path, query). Each becomes the
attributes the API server's authorizer sees (verb, API group, resource, subresource,
namespace), and is checked against the rules bound to the operator's ServiceAccount in
`helm template` output, rendered both for the namespaced install the test ran and for the
default cluster-wide one. Discovery paths are granted to every user by the cluster's own
`system:discovery` role, as on a real cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml
from support.kube import REPO

pytestmark = pytest.mark.slow
CHART = REPO / "charts" / "meritrun"
RELEASE, RELEASE_NS = "mr", "meritrun-system"
SA = f"{RELEASE}-meritrun"


@dataclass(frozen=True)
class Attributes:
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str | None


def request_attributes(method: str, path: str, query: dict[str, str]) -> Attributes | None:
    """What the authorizer sees for an HTTP request; None for non-resource (discovery) URLs."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else ""
    if resource == "namespaces" and len(rest) <= 2:
        namespace = None
    watch = query.get("watch") in ("true", "1")
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
    if method == "GET":
        verb = "watch" if watch else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    assert verb is not None, f"unexpected method {method}"
    return Attributes(verb, group, resource, subresource, namespace)


def bound_rules(docs: list[dict]) -> list[tuple[dict, str | None]]:
    """(rule, namespace it applies in, None = everywhere) for rules bound to our SA."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == SA
                   and s["namespace"] == RELEASE_NS for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        out += [(rule, ns) for rule in role["rules"]]
    return out


def allowed(attrs: Attributes, rules: list[tuple[dict, str | None]]) -> bool:
    full = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    for rule, ns in rules:
        if ns is not None and attrs.namespace != ns:
            continue
        if (attrs.group in rule["apiGroups"] and full in rule["resources"]
                and attrs.verb in rule["verbs"]):
            return True
    return False


def rendered(helm, *args: str) -> list[dict]:
    out = helm.run("template", RELEASE, str(CHART), "--namespace", RELEASE_NS, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


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
                   ("delete", "jobs", ""), ("list", "namespaces", "")]:
        assert needed in seen, f"the e2e run made no {needed} request"


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
