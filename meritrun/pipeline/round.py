"""One round of `decide`: the scratch the stage steps share, and the one way a run fails.

`Round` is mutable but never escapes `decide`: the steps append actions and events to it
and change its copy of the status. `fail` is the only path to a Failed run, whatever the
cause (a stage out of retries, the deadline, quorum, an invalid spec): it stops every Job
the status names and every grant a site still holds, so nothing outlives the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta

from ..api import MeritRunSpec, MeritRunStatus, PartitionStatus, StageStatus
from ..artifacts import RunId
from ..conditions import from_rfc3339, set_condition, to_rfc3339
from .actions import (
    Action,
    CreateJob,
    DeleteJob,
    Event,
    GrantRef,
    OfferAssignment,
    RevokeGrant,
)
from .observations import Observed

INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True)
class Policy:
    """Retry timing; the operator uses the defaults, tests and the local runner shorter ones."""

    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 600.0

    def backoff(self, failed_attempt: int) -> timedelta:
        seconds = self.backoff_base_seconds * 2 ** max(failed_attempt - 1, 0)
        return timedelta(seconds=min(seconds, self.backoff_max_seconds))


@dataclass
class Round:
    """Mutable scratch for one decide() call. `spec` is None when the spec does not validate."""

    spec: MeritRunSpec | None
    obs: Observed
    policy: Policy
    status: MeritRunStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def run(self) -> RunId:
        """The run's name, and the uid its results are under: the status's once recorded
        (a reset run's own), else the object's."""
        return RunId(self.obs.run.name, self.status.run_uid or self.obs.run.uid)

    @property
    def valid_spec(self) -> MeritRunSpec:
        assert self.spec is not None, "a step ran on an invalid spec"
        return self.spec

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def condition(self, type: str, status: str, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type=type, status=status, reason=reason, message=message,
            now=self.obs.now, generation=self.obs.generation)

    def create(self, job: CreateJob) -> None:
        """Queue a Job with what is left of the run's deadline (its activeDeadlineSeconds)."""
        self.actions.append(replace(job, deadline_seconds=self.remaining_seconds()))

    def remaining_seconds(self) -> int | None:
        spec, start = self.spec, self.status.start_time
        if spec is None or spec.active_deadline_seconds is None or start is None:
            return None
        elapsed = (self.obs.now - from_rfc3339(start)).total_seconds()
        return max(1, int(spec.active_deadline_seconds - elapsed))

    def fail_for_spec(self, message: str) -> None:
        """InvalidSpec. A run that never started anything starts over once its spec is fixed;
        one that did stays Failed (its Job names would be reused): it says how to run it
        again."""
        if started(self.status):
            message += ("; the run had started, so a fixed spec does not restart it: delete "
                        "and re-create the MeritRun (locally: --fresh)")
        self.fail(INVALID_SPEC, message)

    def fail(self, reason: str, message: str) -> None:
        """The one way a run fails: status, condition, event, then stop Jobs and grants."""
        st = self.status
        st.phase = "Failed"
        st.message = message
        st.completion_time = to_rfc3339(self.obs.now)
        self.condition("Failed", "True", reason, message)
        self.condition("Ready", "False", reason, message)
        self.event(reason, message, warning=True)
        # Nothing new starts in the round a run fails, not even what an earlier step of it
        # decided: the Jobs the status names are deleted and the grants revoked below.
        self.actions[:] = [a for a in self.actions
                           if not isinstance(a, CreateJob | OfferAssignment)]
        stop_children(self)


def stages_of(st: MeritRunStatus) -> list[StageStatus]:
    stages: list[StageStatus] = [st.profile, st.merge, *st.partitions]
    return stages + ([st.search] if st.search is not None else [])


def named_jobs(r: Round) -> dict[str, str | None]:
    """The Jobs the status says may still run (job -> cluster): a run that stops must stop
    them all, also those created in a round whose Jobs were not observed yet."""
    return {stage.job: _cluster_of(r, stage) for stage in stages_of(r.status)
            if stage.job and stage.state in ("Running", "Verifying")}


def _cluster_of(r: Round, stage: StageStatus) -> str | None:
    seen = r.obs.jobs.get(stage.job or "")
    if seen is not None:
        return seen.cluster
    site = getattr(stage, "site", None)
    if r.spec is None or site is None or stage.state == "Verifying":
        return None
    return site if r.spec.site_mode(site) == "kubeconfig" else None


def stop_children(r: Round) -> None:
    """Delete every Job still running (named or observed) and revoke every live grant."""
    wanted: dict[str, str | None] = {}
    for name, cluster in named_jobs(r).items():
        seen = r.obs.jobs.get(name)
        if seen is None or seen.state == "Active":
            wanted[name] = cluster
    for name, seen in r.obs.jobs.items():
        if seen.state == "Active":
            wanted[name] = seen.cluster
    done = {a.name for a in r.actions if isinstance(a, DeleteJob)}
    r.actions.extend(DeleteJob(n, c) for n, c in sorted(wanted.items()) if n not in done)
    st = r.status
    for held in [*st.partitions, *(st.sketches or [])]:
        if held.state == "AwaitingContribution" and held.grant:
            ref = held_grant(r.run.name, held)
            if ref is not None:
                revoke(r, ref)
    revoke_unwanted(r, wanted={})


def held_grant(run: str, held: object) -> GrantRef | None:
    """The grant a waiting partition or sketch status points at (needs no spec)."""
    site, attempt = getattr(held, "site", None), getattr(held, "attempt", 0)
    if not site or attempt < 1:
        return None
    name = getattr(held, "name", None) if isinstance(held, PartitionStatus) else "sketch"
    return GrantRef(run, site, name or "sketch", attempt)


def revoke(r: Round, ref: GrantRef) -> None:
    if not any(isinstance(a, RevokeGrant) and a.ref == ref for a in r.actions):
        r.actions.append(RevokeGrant(ref))


def revoke_unwanted(r: Round, *, wanted: dict[str, int]) -> None:
    """Level-based: every live grant that is not wanted at its attempt is revoked, each round,
    until the grant store no longer holds it (a failed revocation is simply asked again)."""
    for name, ref in sorted(r.obs.grants.items()):
        if wanted.get(name) != ref.attempt:
            revoke(r, ref)


def started(status: MeritRunStatus) -> bool:
    """Whether the run ever started a Job or asked a site for anything."""
    return status.profile.attempt > 0 or bool(status.sketches) or bool(status.partitions)
