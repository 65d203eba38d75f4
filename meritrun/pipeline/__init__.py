"""The one place that decides: spec + status + what was observed -> new status and actions.

Pure: no I/O, no clock (the time comes in `Observed.now`), no torch, no kopf, no network
client. The operator and the local runner gather observations, call `decide` (through
`meritrun.driver`), and carry out the actions idempotently. Attempt counters and terminal
states live in the status, never re-derived from which children exist, so a deleted Job
cannot reset a retry budget. `decide` never raises on a spec: an invalid spec (observed, or
found while deciding) fails the run through the same `Round.fail` as every other failure.

Modules: `actions` (what comes out), `observations` (what comes in), `round` (one call's
scratch and `fail`), `attempts` (the per-stage attempt machine), `pull` (pull sites),
`quorum` (the one quorum rule), `steps` (the stages in order), `jobs` (Job builders).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from ..api import TERMINAL_PHASES, MeritRunSpec, MeritRunStatus
from ..conditions import from_rfc3339, get_condition, to_rfc3339
from ..errors import MeritRunError
from .actions import (
    Action,
    CreateJob,
    Decision,
    DeleteJob,
    Event,
    GrantRef,
    OfferAssignment,
    RevokeGrant,
    grant_name,
)
from .observations import (
    JobObservation,
    MergeOutcome,
    Observed,
    PartitionResult,
    exit_verdict,
)
from .pull import settle_grants
from .round import INVALID_SPEC, Policy, Round, revoke_unwanted, stages_of, started
from .steps import advance

__all__ = ["Action", "CreateJob", "Decision", "DeleteJob", "Event", "GrantRef",
           "JobObservation", "MergeOutcome", "Observed", "OfferAssignment", "PartitionResult",
           "Policy", "RevokeGrant", "decide", "exit_verdict", "failed_for_spec", "grant_name"]

DEFAULT_POLICY = Policy()


def decide(spec: MeritRunSpec | None, status: MeritRunStatus | None, observed: Observed, *,
           policy: Policy = DEFAULT_POLICY) -> Decision:
    """Advance a run by one round. Same inputs, same decision; never raises on a spec.

    `spec` is None when it does not validate (then `observed.spec_error` says why).
    """
    if (spec is not None and failed_for_spec(status) and status is not None
            and status.observed_generation != observed.generation and not started(status)):
        # The invalid spec was fixed: start over, under a uid of its own, so attempt 1 of
        # the new start never meets what the run before the reset stored.
        status = MeritRunStatus(run_uid=reset_uid(observed))
        observed = replace(observed, plan=None, plan_uri=None, partition_results={},
                           merge_outcome=None, search_best=None, verdicts={}, sketches={})
    try:
        return _decide(Round(spec, observed, policy, _copy(status)))
    except (MeritRunError, ValueError) as e:
        # A spec the models accept but the run cannot follow (a site removed or changed
        # mid-run, a Job the spec cannot describe): a Failed status with the reason.
        r = Round(spec, observed, policy, _copy(status))
        r.status.observed_generation, r.status.run_uid = observed.generation, r.run.uid
        if r.status.phase in TERMINAL_PHASES:
            return _terminal(r)
        r.fail_for_spec(str(e) if isinstance(e, MeritRunError) else f"spec: {e}")
        return _finish(r)


def reset_uid(observed: Observed) -> str:
    """The results uid of a run started over at this generation (deterministic: a round
    whose status write was lost picks the same one again)."""
    return f"{observed.run.uid}-g{observed.generation or 0}"


def _copy(status: MeritRunStatus | None) -> MeritRunStatus:
    """A private copy the round may change (the caller's status is never touched)."""
    if status is None:
        return MeritRunStatus()
    return MeritRunStatus.model_validate(status.model_dump(mode="python", round_trip=True))


def failed_for_spec(status: MeritRunStatus | None) -> bool:
    """The run failed because its spec did not validate (a fixed spec starts it over)."""
    if status is None or status.phase != "Failed":
        return False
    cond = get_condition(status.conditions, "Failed")
    return cond is not None and cond.reason == INVALID_SPEC


def _decide(r: Round) -> Decision:
    st, obs, spec = r.status, r.obs, r.spec
    st.observed_generation = obs.generation
    st.run_uid = r.run.uid
    if st.phase in TERMINAL_PHASES:
        if (obs.spec_error and failed_for_spec(st)
                and not (st.message or "").startswith(obs.spec_error)):
            r.fail_for_spec(obs.spec_error)  # a new verdict on a new generation
            return _finish(r)
        return _terminal(r)
    if spec is None or obs.spec_error:
        r.fail_for_spec(obs.spec_error or "spec does not validate")
        return _finish(r)
    if st.start_time is None:
        st.start_time = to_rfc3339(obs.now)
        r.event("Started", "run accepted")
    if spec.active_deadline_seconds is not None:
        elapsed = (obs.now - from_rfc3339(st.start_time)).total_seconds()
        if elapsed > spec.active_deadline_seconds:
            r.fail("DeadlineExceeded", f"run exceeded activeDeadlineSeconds "
                   f"({spec.active_deadline_seconds}s)")
            return _finish(r)
    if spec.suspend:
        if st.phase != "Suspended":
            r.event("Suspended", "no new Jobs while spec.suspend is true")
        st.phase = "Suspended"
        r.condition("Suspended", "True", "SuspendedBySpec", "spec.suspend is true")
        settle_grants(r)
        return _finish(r)
    if st.phase == "Suspended":
        r.condition("Suspended", "False", "Resumed", "spec.suspend is false")
        r.event("Resumed", "run resumed")
    advance(r)
    done = sum(p.state == "Succeeded" for p in st.partitions)
    st.progress = f"{done}/{len(st.partitions)}" if st.partitions else None
    settle_grants(r)
    return _finish(r)


def _terminal(r: Round) -> Decision:
    """Terminal is final: create nothing; stop Jobs still seen running, revoke live grants."""
    r.actions = [DeleteJob(name, job.cluster) for name, job in sorted(r.obs.jobs.items())
                 if job.state == "Active"]
    revoke_unwanted(r, wanted={})
    return Decision(r.status, tuple(r.actions), ())


def _finish(r: Round) -> Decision:
    return Decision(r.status, tuple(r.actions), tuple(r.events), _requeue_after(r))


def _requeue_after(r: Round) -> timedelta | None:
    """When the next change of our own making is due: a backoff's end, a deadline."""
    st, now = r.status, r.obs.now
    if st.phase in TERMINAL_PHASES:
        return None
    due = [from_rfc3339(s.retry_after) for s in stages_of(st)
           if s.state == "BackingOff" and s.retry_after]
    spec = r.spec
    if spec is not None and spec.active_deadline_seconds is not None and st.start_time:
        due.append(from_rfc3339(st.start_time) + timedelta(
            seconds=spec.active_deadline_seconds + 1))
    for p in [*st.partitions, *(st.sketches or [])]:
        if p.state != "AwaitingContribution" or spec is None or spec.site_mode(p.site) is None:
            continue
        site = spec.site(p.site)
        if site.deadline_seconds and p.start_time:
            due.append(from_rfc3339(p.start_time) + timedelta(seconds=site.deadline_seconds + 1))
    if not due:
        return None
    return max(min(due) - now, timedelta(0))
