"""The one place that decides: spec + status + what was observed -> new status and actions.

Pure: no I/O, no clock (the time comes in `Observed.now`), no torch, no kopf. The operator
and the local runner gather observations, call `decide`, and carry out the actions
idempotently. Attempt counters and terminal states live in the status, never re-derived from
which children exist, so a deleted Job cannot reset a retry budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from . import contributions, jobs
from .api import (
    TERMINAL_PHASES,
    ArtifactRef,
    MeritRunSpec,
    MeritRunStatus,
    PartitionStatus,
    PlanSummary,
    StageStatus,
)
from .conditions import from_rfc3339, set_condition, to_rfc3339
from .contributions import OfferAssignment, RevokeGrant
from .jobs import CreateJob
from .observations import JobObservation, MergeOutcome, Observed, PartitionResult

__all__ = ["Action", "Decision", "DeleteJob", "Event", "JobObservation", "MergeOutcome",
           "Observed", "OfferAssignment", "PartitionResult", "Policy", "RevokeGrant", "decide"]

@dataclass(frozen=True)
class DeleteJob:
    name: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Policy:
    """Retry timing; the operator uses the defaults, tests and the local runner shorter ones."""

    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 600.0

    def backoff(self, failed_attempt: int) -> timedelta:
        seconds = self.backoff_base_seconds * 2 ** max(failed_attempt - 1, 0)
        return timedelta(seconds=min(seconds, self.backoff_max_seconds))


Action = CreateJob | DeleteJob | OfferAssignment | RevokeGrant


@dataclass(frozen=True)
class Decision:
    status: MeritRunStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()


@dataclass
class _Round:
    """Mutable scratch for one decide() call; never escapes it."""

    spec: MeritRunSpec
    obs: Observed
    policy: Policy
    status: MeritRunStatus
    actions: list = field(default_factory=list)
    events: list = field(default_factory=list)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def condition(self, type: str, status: str, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type=type, status=status, reason=reason, message=message,
            now=self.obs.now, generation=self.obs.generation)

    def fail(self, reason: str, message: str) -> None:
        self.status.phase = "Failed"
        self.status.message = message
        self.status.completion_time = to_rfc3339(self.obs.now)
        self.condition("Failed", "True", reason, message)
        self.condition("Ready", "False", reason, message)
        self.event(reason, message, warning=True)
        for name, job in self.obs.jobs.items():
            if job.state == "Active":
                self.actions.append(DeleteJob(name))
        contributions.outstanding_grants(self)


def decide(spec: MeritRunSpec, status: MeritRunStatus | None, observed: Observed, *,
           policy: Policy = Policy()) -> Decision:
    """Advance a run by one round. Calling it again with the same inputs is harmless."""
    r = _Round(spec, observed, policy, (status or MeritRunStatus()).model_copy(deep=True))
    st = r.status
    st.observed_generation = observed.generation
    if st.phase in TERMINAL_PHASES:
        return Decision(st)
    if st.start_time is None:
        st.start_time = to_rfc3339(observed.now)
        r.event("Started", "run accepted")
    if spec.active_deadline_seconds is not None:
        elapsed = (observed.now - from_rfc3339(st.start_time)).total_seconds()
        if elapsed > spec.active_deadline_seconds:
            r.fail("DeadlineExceeded", f"run exceeded activeDeadlineSeconds "
                   f"({spec.active_deadline_seconds}s)")
            return Decision(st, tuple(r.actions), tuple(r.events))
    if spec.suspend:
        if st.phase != "Suspended":
            r.event("Suspended", "no new Jobs while spec.suspend is true")
        st.phase = "Suspended"
        r.condition("Suspended", "True", "SuspendedBySpec", "spec.suspend is true")
        return Decision(st, (), tuple(r.events))
    if st.phase == "Suspended":
        r.condition("Suspended", "False", "Resumed", "spec.suspend is false")
        r.event("Resumed", "run resumed")
    _advance(r)
    done = sum(p.state == "Succeeded" for p in st.partitions)
    st.progress = f"{done}/{len(st.partitions)}" if st.partitions else None
    return Decision(st, tuple(r.actions), tuple(r.events))


def _advance(r: _Round) -> None:
    st = r.status
    if st.plan is None:
        st.phase = "Profiling"
        _profile(r)
        if st.plan is None or st.phase == "Failed":
            return
    if not all(p.state in ("Succeeded", "Failed") for p in st.partitions):
        st.phase = "Training"
        for part in st.partitions:
            _partition(r, part)
        if not all(p.state in ("Succeeded", "Failed") for p in st.partitions):
            return
    if st.merge.state != "Succeeded":
        _merge(r)
        if st.merge.state != "Succeeded":
            return
    if r.spec.mixture_search.enabled and (st.search is None or st.search.state != "Succeeded"):
        _search(r)
        if st.search is None or st.search.state != "Succeeded":
            return
    st.phase = "Succeeded"
    st.completion_time = to_rfc3339(r.obs.now)
    st.message = f"merged model at {st.model_uri}"
    r.condition("Ready", "True", "Succeeded", st.message)
    r.event("Succeeded", st.message)


def _step_job(r: _Round, stage: StageStatus, *, label: str, has_result: bool,
              make_job: Callable[[int], CreateJob]) -> None:
    """Generic single-Job attempt machine: start, observe, back off, retry, give up."""
    obs = r.obs
    if stage.state in ("Succeeded", "Failed"):
        return
    if stage.state == "Pending":
        _start(r, stage, make_job(stage.attempt + 1), label)
        return
    if stage.state == "BackingOff":
        if stage.retry_after is None or obs.now >= from_rfc3339(stage.retry_after):
            _start(r, stage, make_job(stage.attempt + 1), label)
        return
    job = obs.jobs.get(stage.job or "")
    held = job is not None and job.state == "Active" and not has_result
    _note_waiting(r, stage, label, job.waiting if held else None)
    if has_result:
        stage.state = "Succeeded"
        stage.completion_time = to_rfc3339(obs.now)
        stage.message = None
        r.event(f"{label.capitalize()}Succeeded", f"{label} attempt {stage.attempt} succeeded")
    elif job is None:
        # The Job vanished (deleted, or we crashed before creating it): create it again
        # under the same name; the attempt counter does not move.
        r.actions.append(make_job(stage.attempt))
    elif job.state == "Failed" or job.state == "Succeeded":
        reason = job.message or "job failed"
        if job.state == "Succeeded":
            reason = "job succeeded but wrote no complete artifact"
        _failed_attempt(r, stage, label, reason)


def _note_waiting(r: _Round, stage: StageStatus, label: str, waiting: str | None) -> None:
    """A Job that is Active but held (queue, image, scheduling) shows why, once as an event."""
    if waiting and waiting != stage.waiting:
        r.event("JobWaiting", f"{label} attempt {stage.attempt}: {waiting}", warning=True)
    stage.waiting = waiting


def _start(r: _Round, stage: StageStatus, job: CreateJob, label: str) -> None:
    stage.attempt = job.attempt
    stage.job = job.name
    stage.state = "Running"
    stage.retry_after = None
    stage.start_time = stage.start_time or to_rfc3339(r.obs.now)
    r.actions.append(job)
    r.event("JobCreated", f"{label} attempt {job.attempt}: job {job.name}")


def _failed_attempt(r: _Round, stage: StageStatus, label: str, reason: str) -> None:
    stage.message = f"attempt {stage.attempt}: {reason}"
    if stage.attempt <= r.spec.backoff_limit:
        stage.state = "BackingOff"
        stage.retry_after = to_rfc3339(r.obs.now + r.policy.backoff(stage.attempt))
        r.event("Retrying", f"{label} {stage.message}; retry after {stage.retry_after}",
                warning=True)
    else:
        stage.state = "Failed"
        stage.completion_time = to_rfc3339(r.obs.now)
        r.event(f"{label.capitalize()}Failed",
                f"{label} failed after {stage.attempt} attempts: {reason}", warning=True)


def _profile(r: _Round) -> None:
    st, obs = r.status, r.obs
    site_sketches = contributions.sketches_ready(r)
    if site_sketches is None:
        return  # waiting for pull sites' sketches, or one of them failed the run
    has_plan = obs.plan is not None and st.profile.state == "Running"
    _step_job(r, st.profile, label="profile", has_result=has_plan,
              make_job=lambda a: jobs.profile_job(obs.run, r.spec, a,
                                                  site_sketches=site_sketches))
    if st.profile.state == "Failed":
        r.fail("ProfileFailed", st.profile.message or "profile failed")
    elif st.profile.state == "Succeeded" and obs.plan is not None:
        plan = obs.plan
        st.plan = PlanSummary(strategy=plan.strategy, partitions=len(plan.partitions),
                              explained_variance=plan.explained_variance, uri=obs.plan_uri)
        st.profile.artifact = ArtifactRef(uri=obs.plan_uri) if obs.plan_uri else None
        st.partitions = [
            PartitionStatus(name=p.name, index=p.index, sources=p.sources, site=p.site,
                            tokens=p.tokens, planned_tokens=p.tokens)
            for p in plan.partitions
        ]
        r.condition("Profiled", "True", "PlanReady", f"{len(plan.partitions)} partitions "
                    f"({plan.strategy})")


def _partition(r: _Round, part: PartitionStatus) -> None:
    obs, spec = r.obs, r.spec
    mode = contributions.site_mode(spec, part.site)
    if mode == "pull":
        contributions.pull_partition(r, part)
        return
    result = obs.partition_results.get(part.name)
    cluster = part.site if mode == "kubeconfig" else None
    _step_job(r, part, label=f"partition {part.name}", has_result=result is not None,
              make_job=lambda a: jobs.train_job(obs.run, spec, part, a, cluster=cluster))
    if part.state == "Succeeded" and result is not None:
        part.tokens, part.artifact = result.tokens, result.artifact


def _merge(r: _Round) -> None:
    st, obs, spec = r.status, r.obs, r.spec
    succeeded = [p for p in st.partitions if p.state == "Succeeded"]
    left_out = [p.name for p in st.partitions if p.state != "Succeeded"]
    needed = spec.merge.quorum * len(st.partitions)
    if not succeeded or len(succeeded) + 1e-9 < needed:
        r.fail("QuorumNotMet", f"{len(succeeded)}/{len(st.partitions)} partitions succeeded; "
               f"quorum {spec.merge.quorum} not met (failed: {', '.join(left_out)})")
        return
    if st.merge.state == "Pending":
        st.merge.method, st.merge.included = spec.merge.method, [p.name for p in succeeded]
        st.merge.left_out = left_out or None
        r.condition("Trained", "True", "PartitionsDone",
                    f"{len(succeeded)}/{len(st.partitions)} partitions succeeded")
    st.phase = "Merging"
    included = [p for p in st.partitions if p.name in (st.merge.included or [])]
    outcome = obs.merge_outcome
    job = obs.jobs.get(st.merge.job or "")
    if (outcome is not None and outcome.model_uri is None and outcome.refused
            and st.merge.state == "Running" and job is not None and job.state == "Failed"):
        # Refusals are a verdict on the inputs: retrying the same inputs cannot change it.
        st.merge.state = "Failed"
        st.merge.message = "too few trustworthy contributions: " + "; ".join(
            f"{k}: {v}" for k, v in sorted(outcome.refused.items()))
    _step_job(r, st.merge, label="merge",
              has_result=outcome is not None and outcome.model_uri is not None,
              make_job=lambda a: jobs.merge_job(obs.run, spec, included, a))
    if outcome is not None and outcome.refused:
        for p in st.partitions:
            if p.name in outcome.refused:
                p.message = f"refused by merge: {outcome.refused[p.name]}"
        st.merge.left_out = sorted(set(st.merge.left_out or []) | set(outcome.refused))
    if st.merge.state == "Succeeded" and outcome is not None:
        st.model_uri = outcome.model_uri
        st.merge.artifact = ArtifactRef(uri=outcome.model_uri)
        r.condition("Merged", "True", "MergeSucceeded", f"model at {outcome.model_uri}")
    elif st.merge.state == "Failed":
        r.fail("MergeFailed", st.merge.message or "merge failed")


def _search(r: _Round) -> None:
    from .api import SearchStatus

    st, obs = r.status, r.obs
    st.search = st.search or SearchStatus()
    st.phase = "Searching"
    included = [p for p in st.partitions if p.name in (st.merge.included or [])]
    _step_job(r, st.search, label="search", has_result=obs.search_best is not None,
              make_job=lambda a: jobs.search_job(obs.run, r.spec, included, a))
    if st.search.state == "Succeeded" and obs.search_best is not None:
        st.search.best = dict(obs.search_best)
    elif st.search.state == "Failed":
        r.fail("SearchFailed", st.search.message or "mixture search failed")
