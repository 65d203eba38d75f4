"""Pure readers of our stage pods: why one failed, and which Jobs have a pod started.

The backend reads pods for three things the Job does not say: a failed stage's own reason
(its termination message, the log tail), a stuck pod's waiting reason (`manifests`), and
whether any pod of a Job has started (before that, its stage cannot have written progress).
"""

from __future__ import annotations

import re
from typing import Any

from meritrun.errors import find_error_line, most_decisive

from .manifests import LABEL_RUN_UID

STARTED_POD_PHASES = frozenset({"Running", "Succeeded", "Failed"})


def failed_pod(job_message: str | None) -> str | None:
    """The pod a Job's Failed condition names ("... for pod <ns>/<name> failed with exit code
    137 matching FailJob rule ..."), or None."""
    found = _FAILED_POD.search(job_message or "")
    return found.group(1) if found else None


_FAILED_POD = re.compile(r"\bpod [a-z0-9][-a-z0-9]*/([a-z0-9][-.a-z0-9]*[a-z0-9])\b")


def termination_reason(pods: list[dict[str, Any]], *, culprit: str | None = None
                       ) -> tuple[str | None, int | None]:
    """The stage's own one-line reason, from its pod's termination message (the log tail),
    and the exit code that decides a retry (of a gang's pods, the most decisive one).

    The reason of a multi-node gang is the pod's that failed the Job (`culprit`, named by the
    Job controller), when it is among `pods`: the others died of losing it, and their last
    words (a peer's connection reset) would hide the cause.
    """
    speakers = [p for p in pods if (p.get("metadata") or {}).get("name") == culprit] or pods
    reason, code = None, None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            ended = (cs.get("state") or {}).get("terminated") or {}
            code = most_decisive([code, ended.get("exitCode")])
            if pod in speakers:
                reason = find_error_line((ended.get("message") or "").splitlines(),
                                         limit=300) or reason
    return reason, code


def started_jobs(pods: list[dict[str, Any]], *, run_uid: str) -> set[str]:
    """Jobs (by `job-name`) of this run incarnation with a pod that has started."""
    out = set()
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if (labels.get(LABEL_RUN_UID) == run_uid and labels.get("job-name")
                and (pod.get("status") or {}).get("phase") in STARTED_POD_PHASES):
            out.add(labels["job-name"])
    return out
