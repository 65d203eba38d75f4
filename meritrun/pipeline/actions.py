"""The whole vocabulary of what `decide` asks a backend to do, and what it returns.

Every action is idempotent by construction (deterministic names, the attempt inside), so a
backend may carry out the same action twice, or a later round may repeat a lost one. A
backend carries these out and nothing else: it never decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..api import MeritRunStatus
    from ..assignment import Assignment
    from ..stages import MergeParams, ProfileParams, SearchParams, TrainParams, VerifyParams

    StageParams = ProfileParams | TrainParams | MergeParams | SearchParams | VerifyParams

Stage = Literal["profile", "train", "merge", "search", "verify"]


@dataclass(frozen=True)
class CreateJob:
    """Start one attempt of a stage (idempotent: same name, same attempt)."""

    stage: Stage
    name: str
    attempt: int
    params: StageParams
    partition: str | None = None
    cluster: str | None = None  # a kubeconfig site, or None for this cluster
    deadline_seconds: int | None = None  # what is left of spec.activeDeadlineSeconds


@dataclass(frozen=True)
class DeleteJob:
    """Stop a Job (and its params) on the cluster it runs on (404 is fine)."""

    name: str
    cluster: str | None = None


@dataclass(frozen=True)
class GrantRef:
    """Which grant: enough to find its stored bundle and its storage identity, nothing more.

    A revocation needs only this, never the spec, so a spec edited (or invalid) since the
    offer cannot stop a site from losing its access.
    """

    run: str
    site: str
    name: str  # the partition, or "sketch"
    attempt: int

    @property
    def grant(self) -> str:
        return grant_name(self.run, self.name, self.site)


def grant_name(run: str, name: str, site: str) -> str:
    """One grant per partition (or per site's sketches); a new attempt replaces it."""
    return f"{run}-{name}-grant" if name != "sketch" else f"{run}-sketch-{site}-grant"


@dataclass(frozen=True)
class OfferAssignment:
    """Write the assignment and give its site a grant (same attempt: same grant name)."""

    assignment: Assignment
    grant: str  # the grant's name: a Secret (operator) or a file under the workdir (local)
    expires: datetime

    @property
    def ref(self) -> GrantRef:
        a = self.assignment
        return GrantRef(a.run, a.site, a.name, a.attempt)


@dataclass(frozen=True)
class RevokeGrant:
    """The site may no longer read or write with this grant (idempotent)."""

    ref: GrantRef

    @property
    def grant(self) -> str:
        return self.ref.grant


@dataclass(frozen=True)
class Event:
    """A Kubernetes event (or a log line locally). `reason` is a constant CamelCase word."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = CreateJob | DeleteJob | OfferAssignment | RevokeGrant


@dataclass(frozen=True)
class Decision:
    """One round's verdict: the new status (written last), actions, events, next look."""

    status: MeritRunStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: timedelta | None = None  # look again by then (a backoff ends), if not sooner
