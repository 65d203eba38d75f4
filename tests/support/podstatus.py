"""The pod statuses the node stand-in (support.kubelet) reports, as the kubelet writes them:
pure builders of the `status` object for waiting, running, exited and killed pods.

The pod's address is the node's, 127.0.0.1 (every pod here shares the loopback). A process
killed by signal n exits with 128 + n, as a container runtime reports it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

POD_IP = "127.0.0.1"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cond(type_: str, status: str, reason: str | None = None,
         message: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"type": type_, "status": status, "lastProbeTime": None,
                         "lastTransitionTime": now()}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def container(pod: dict[str, Any], state: dict[str, Any], *, ready: bool = False
              ) -> dict[str, Any]:
    c = pod["spec"]["containers"][0]
    return {"name": c["name"], "image": c.get("image", ""), "imageID": "",
            "ready": ready, "restartCount": 0, "started": "running" in state, "state": state}


def waiting(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {"phase": "Pending", "hostIP": POD_IP, "conditions": [
        cond("PodScheduled", "True"), cond("Ready", "False", "ContainersNotReady")],
        "containerStatuses": [container(pod, {"waiting": {"reason": reason,
                                                          "message": message}})]}


def running(pod: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    flag, t = "True" if ready else "False", now()
    return {"phase": "Running", "hostIP": POD_IP, "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": t,
            "conditions": [cond("PodScheduled", "True"), cond("Initialized", "True"),
                           cond("ContainersReady", flag), cond("Ready", flag)],
            "containerStatuses": [container(pod, {"running": {"startedAt": t}}, ready=ready)]}


def _finished(pod: dict[str, Any], code: int, message: str | None,
              kept: list[dict[str, Any]]) -> dict[str, Any]:
    t = now()
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                  "startedAt": t, "finishedAt": t}
    if message is not None:
        terminated["message"] = message
    return {"phase": "Succeeded" if code == 0 else "Failed",
            "conditions": kept + [cond("PodScheduled", "True"), cond("Initialized", "True"),
                                  cond("ContainersReady", "False", "PodCompleted"),
                                  cond("Ready", "False", "PodCompleted")],
            "containerStatuses": [container(pod, {"terminated": terminated})]}


def exited(pod: dict[str, Any], code: int, message: str = "") -> dict[str, Any]:
    """The process ended with `code` (Popen's: negative for a signal)."""
    return _finished(pod, code if code >= 0 else 128 - code, message, [])


def killed(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod deleted before it finished ends Failed (exit 137), as the kubelet reports it,
    keeping an eviction's DisruptionTarget condition: the Job controller waits for a terminal
    phase before it counts the pod's failure (podFailurePolicy) or starts its replacement
    (podReplacementPolicy: Failed)."""
    kept = [c for c in (pod.get("status") or {}).get("conditions") or []
            if c.get("type") == "DisruptionTarget"]
    return _finished(pod, 137, None, kept)
