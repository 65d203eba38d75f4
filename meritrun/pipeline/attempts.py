"""The generic per-stage attempt machine: start, observe, back off, retry, give up.

Every single-Job stage (profile, a partition on this or a kubeconfig cluster, merge, search)
goes through `step_job`. The attempt counter lives in the status and only moves forward;
`job_seen` records that the current attempt's Job was observed, so a Job that vanishes
afterwards (the TTL controller, a user's delete) counts as that attempt's failure instead of
being created again under the same attempt (which would bypass backoffLimit).
"""

from __future__ import annotations

from collections.abc import Callable

from ..api import StageStatus
from ..conditions import from_rfc3339, to_rfc3339
from .actions import CreateJob
from .round import Round

VANISHED = "its Job vanished after it was seen (deleted, or removed after finishing)"


def step_job(r: Round, stage: StageStatus, *, kind: str, label: str, has_result: bool,
             make_job: Callable[[int], CreateJob]) -> None:
    """One round of one stage. `kind` names the events (ProfileSucceeded, PartitionFailed);
    `label` says which one in their messages ("partition p0")."""
    obs = r.obs
    if stage.state in ("Succeeded", "Failed"):
        return
    if stage.state == "Pending":
        start(r, stage, make_job(stage.attempt + 1), label)
        return
    if stage.state == "BackingOff":
        if stage.retry_after is None or obs.now >= from_rfc3339(stage.retry_after):
            start(r, stage, make_job(stage.attempt + 1), label)
        return
    job = obs.jobs.get(stage.job or "")
    held = job is not None and job.state == "Active" and not has_result
    note_waiting(r, stage, label, job.waiting if job is not None and held else None)
    if has_result:
        stage.state = "Succeeded"
        stage.completion_time = to_rfc3339(obs.now)
        stage.message = None
        r.event(f"{kind}Succeeded", f"{label} attempt {stage.attempt} succeeded")
    elif job is None and stage.job_seen:
        failed_attempt(r, stage, kind=kind, label=label, reason=VANISHED)
    elif job is None:
        # Never seen: lost before it was created (a crash between deciding and acting) or
        # not visible yet. Create it again under the same name; the attempt does not move.
        r.create(make_job(stage.attempt))
    else:
        stage.job_seen = True
        if job.state in ("Failed", "Succeeded"):
            reason = job.message or "job failed"
            if job.state == "Succeeded":
                reason = "job succeeded but wrote no complete artifact"
            failed_attempt(r, stage, kind=kind, label=label, reason=reason,
                           permanent=job.permanent, invalid_spec=job.invalid_spec)


def note_waiting(r: Round, stage: StageStatus, label: str, waiting: str | None) -> None:
    """A Job that is Active but held (queue, image, scheduling) shows why, once as an event."""
    if waiting and waiting != stage.waiting:
        r.event("JobWaiting", f"{label} attempt {stage.attempt}: {waiting}", warning=True)
    stage.waiting = waiting


def start(r: Round, stage: StageStatus, job: CreateJob, label: str) -> None:
    stage.attempt = job.attempt
    stage.job = job.name
    stage.state = "Running"
    stage.retry_after = None
    stage.job_seen = None
    stage.start_time = stage.start_time or to_rfc3339(r.obs.now)
    r.create(job)
    r.event("JobCreated", f"{label} attempt {job.attempt}: job {job.name}")


def failed_attempt(r: Round, stage: StageStatus, *, kind: str, label: str, reason: str,
                   permanent: bool = False, invalid_spec: bool = False) -> None:
    """Back off and retry while the budget lasts; a permanent failure gives up at once, and
    one the stage blamed on the spec (GPUs the image cannot use) fails the run InvalidSpec:
    every other stage would meet the same spec."""
    stage.message = f"attempt {stage.attempt}: {reason}"
    if invalid_spec:
        stage.state = "Failed"
        stage.completion_time = to_rfc3339(r.obs.now)
        r.fail_for_spec(f"{label} {stage.message}")
    elif stage.attempt <= r.valid_spec.backoff_limit and not permanent:
        stage.state = "BackingOff"
        stage.retry_after = to_rfc3339(r.obs.now + r.policy.backoff(stage.attempt))
        r.event("Retrying", f"{label} {stage.message}; retry after {stage.retry_after}",
                warning=True)
    else:
        stage.state = "Failed"
        stage.completion_time = to_rfc3339(r.obs.now)
        why = "a permanent failure" if permanent else f"{stage.attempt} attempts"
        r.event(f"{kind}Failed", f"{label} failed after {why}: {reason}", warning=True)
