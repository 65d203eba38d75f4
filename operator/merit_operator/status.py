"""Pure helpers for the MeritRun status as the operator writes it.

The pipeline decides the status (an invalid spec included: the round observes it and
`decide` fails the run). This module covers what only the operator meets: reading the spec
and status off the object, the merge patch that turns an old status into a new one (keys
that disappeared are sent as null, so the status subresource never keeps a stale
`retryAfter` or `message`), and when to look again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from meritrun.api import TERMINAL_PHASES, MeritRunSpec, MeritRunStatus, ObjectMeta
from meritrun.errors import SpecError
from meritrun.validation import parse_spec, pydantic_errors


def mark_seen(status: MeritRunStatus, jobs: set[str]) -> MeritRunStatus:
    """`jobSeen` for each running stage whose current Job is in `jobs` (created or adopted by
    this round's commit: the API server has it), in the same write as the rest of the round's
    status rather than one more write when a later round first observes it. Safe because the
    Job store remembers our own creations until its watch brings them (`WatchStore.remember`):
    a later round misses the Job only once it really is gone."""
    stages = [status.profile, *status.partitions, status.merge]
    for stage in [*stages, *([status.search] if status.search else [])]:
        if stage.state == "Running" and stage.job in jobs:
            stage.job_seen = True
    return status


def validated_spec(body: dict[str, Any]) -> MeritRunSpec:
    """The run's spec as a model, or SpecError naming the first bad field."""
    try:  # child Job names append a stage and an attempt to the run's name
        ObjectMeta.model_validate(body.get("metadata") or {})
    except ValidationError as e:
        path, _, message = pydantic_errors(e, prefix="metadata")[0].partition(": ")
        raise SpecError(message, path=path) from e
    spec = parse_spec(body.get("spec") or {})
    if spec.storage is None:
        raise SpecError("Field required: runs on Kubernetes need S3 storage shared by every "
                        "stage (endpoint, bucket, secretRef)", path="spec.storage")
    try:
        root = spec.storage.root_uri()
    except ValueError as e:
        raise SpecError(str(e), path="spec.storage") from e
    if not root.startswith("s3://"):
        raise SpecError(f"{root!r} is not reachable from stage pods; use an s3:// uri or a "
                        "bucket", path="spec.storage.uri")
    return spec


def parse_status(raw: dict[str, Any] | None) -> MeritRunStatus | None:
    """The stored status; fields this version does not know are ignored, not an error.

    After a rollback an older operator reads a status written by a newer one: rejecting its
    new fields would fail every round. They are left alone in the stored status (the merge
    patch only touches what this version knows) and come back into use after a roll-forward.
    """
    return MeritRunStatus.model_validate(raw, extra="ignore") if raw else None


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning old into new (None when equal); lists are replaced."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
            continue
        sub = merge_patch(old[key], value)
        if sub is not None or (value is None and old[key] is not None):
            patch[key] = sub if isinstance(value, dict) else value
    return patch or None


def next_delay(status: MeritRunStatus, *, requeue_after: timedelta | None,
               resync_seconds: float, idle_seconds: float) -> float:
    """Seconds until the next round: at the latest resync, sooner when the pipeline says a
    change of its own is due (a backoff ends, a deadline passes)."""
    if status.phase in TERMINAL_PHASES:
        return idle_seconds
    if requeue_after is None:
        return resync_seconds
    return min(resync_seconds, requeue_after.total_seconds() + 0.05)
