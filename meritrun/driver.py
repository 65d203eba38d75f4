"""The one round every backend runs: observe -> decide -> act -> write the status last.

The operator's `Reconciler` and the local runner both call `run_round` with a `Backend`,
so each backend is a thin adapter that only knows how to observe and how to carry out one
action. Why this order: the actions are idempotent and level-based, so if the process dies
between acting and writing, the next round decides the same actions again from the old
status; the status is written last so it never claims what was not attempted.

No error is swallowed: an action that fails with a `MeritRunError` (an API or storage error)
does not stop the others (a failed revocation must not keep a Job from being deleted); the
status is still written, and then `ActionsFailed` names every failure, so the caller retries
the round (kopf: a TemporaryError; locally: the next round, then a clear error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from .api import MeritRunSpec, MeritRunStatus
from .errors import MeritRunError
from .pipeline import (
    Action,
    CreateJob,
    Decision,
    DeleteJob,
    Event,
    Observed,
    OfferAssignment,
    Policy,
    RevokeGrant,
    decide,
)

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a place that runs MeritRuns must do; it decides nothing."""

    def observe(self, spec: MeritRunSpec | None, status: MeritRunStatus | None,
                now: datetime) -> Observed: ...
    def create_job(self, action: CreateJob) -> None: ...
    def delete_job(self, name: str, cluster: str | None) -> None: ...
    def offer_grant(self, action: OfferAssignment) -> None: ...
    def revoke_grant(self, action: RevokeGrant) -> None: ...
    def post_event(self, event: Event) -> None: ...
    def write_status(self, status: MeritRunStatus) -> None: ...


@dataclass(frozen=True)
class Failure:
    action: Action
    error: MeritRunError

    def __str__(self) -> str:
        what = getattr(self.action, "name", None) or getattr(self.action, "grant", "")
        return f"{type(self.action).__name__} {what}: {str(self.error)[:300]}"


class ActionsFailed(MeritRunError):
    """Some actions of a round failed; the status was written, the round must be repeated."""

    def __init__(self, decision: Decision, failures: list[Failure]) -> None:
        self.decision, self.failures = decision, tuple(failures)
        super().__init__("; ".join(str(f) for f in failures))


def apply(backend: Backend, action: Action) -> None:
    """Carry out one action through the backend interface."""
    if isinstance(action, CreateJob):
        backend.create_job(action)
    elif isinstance(action, DeleteJob):
        backend.delete_job(action.name, action.cluster)
    elif isinstance(action, OfferAssignment):
        backend.offer_grant(action)
    elif isinstance(action, RevokeGrant):
        backend.revoke_grant(action)
    else:  # pragma: no cover - the vocabulary is closed
        raise TypeError(f"unknown action {action!r}")


def run_round(backend: Backend, spec: MeritRunSpec | None, status: MeritRunStatus | None, *,
              now: datetime, policy: Policy) -> Decision:
    """One round. Raises ActionsFailed (after writing the status) if any action failed."""
    observed = backend.observe(spec, status, now)
    decision = decide(spec, status, observed, policy=policy)
    failures: list[Failure] = []
    for action in decision.actions:
        try:
            apply(backend, action)
        except MeritRunError as e:
            log.warning("run %s: %s failed: %s", observed.run, type(action).__name__,
                        str(e)[:300])
            failures.append(Failure(action, e))
    for event in decision.events:
        backend.post_event(event)
    backend.write_status(decision.status)
    if failures:
        raise ActionsFailed(decision, failures)
    return decision
