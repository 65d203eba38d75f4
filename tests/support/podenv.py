"""What the kubelet does to a container's env and command before it starts, for the node
stand-in (support.kubelet): pure functions, tested in tests/unit/test_podenv.py.

- `expand`: `$(VAR)` references, as the kubelet expands them in env values (against the
  variables defined before, in order) and in command and args (against the container's whole
  env): `$$` is a literal `$`, a reference to an undefined variable and an unclosed `$(` stay
  as written, a `$` before anything else stays.
- `field_value`: the downward API for env `valueFrom.fieldRef` (metadata.name, namespace, uid,
  one label or annotation such as the Job controller's
  `metadata.annotations['batch.kubernetes.io/job-completion-index']`, spec.nodeName,
  spec.serviceAccountName, status.hostIP and status.podIP). The Job controller itself puts
  JOB_COMPLETION_INDEX (a fieldRef to that annotation) into an Indexed Job's pods, and sets
  their hostname to `<job>-<index>`; nothing of that is the kubelet's.
- `resolve_pod_names`: cluster DNS. A pod with `hostname` and `subdomain` (a headless Service)
  is `<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]`. There is no cluster DNS
  here and every pod of this node has one address, 127.0.0.1 (the pod IP the node reports), so
  the node plays the resolver: such a name of the pod's own subdomain, as a whole word of a
  command-line argument or env value, becomes 127.0.0.1 before the process starts. That is
  the only difference from a cluster, where the process resolves the same name to the same pod
  through the headless Service's DNS records. Names of other subdomains are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

POD_IP = "127.0.0.1"
_ITEM = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def expand(text: str, env: Mapping[str, str]) -> str:
    """`text` with `$(NAME)` replaced from `env` under the kubelet's rules (module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$" or i + 1 == len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":  # escaped: one literal dollar
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # unclosed: kept as written
                out.append("$(")
                i += 2
                continue
            name = text[i + 2:close]
            out.append(env[name] if name in env else f"$({name})")
            i = close + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


class FieldError(ValueError):
    """A fieldRef path the downward API does not offer for env (the API server would refuse
    the pod; the stand-in says which path)."""


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of `valueFrom.fieldRef.fieldPath` for this pod ("" for a missing key)."""
    meta, spec, status = (pod.get("metadata") or {}), (pod.get("spec") or {}), (
        pod.get("status") or {})
    item = _ITEM.match(path)
    if item:
        return str((meta.get(item.group(1)) or {}).get(item.group(2), ""))
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.hostIP": status.get("hostIP") or POD_IP,
              "status.podIP": status.get("podIP") or POD_IP}
    if path not in simple:
        raise FieldError(f"unsupported fieldRef fieldPath {path!r}")
    return str(simple[path] or "")


def resolve_pod_names(text: str, pod: Mapping[str, Any]) -> str:
    """`text` with DNS names of pods in this pod's subdomain replaced by the pod IP."""
    subdomain = (pod.get("spec") or {}).get("subdomain")
    if not subdomain:
        return text
    ns = re.escape((pod.get("metadata") or {}).get("namespace") or "default")
    name = re.compile(rf"(?<![-.\w]){_LABEL}\.{re.escape(subdomain)}"
                      rf"(\.{ns}(\.svc(\.cluster\.local)?)?)?(?![-\w]|\.\w)")
    return name.sub(POD_IP, text)
