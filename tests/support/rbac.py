"""The chart's RBAC as the API server's authorizer sees it, for tests that check recorded
requests against `helm template` output (test_rbac, the federated end-to-end test)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .kube import REPO

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
