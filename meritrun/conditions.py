"""Pure helpers for standard Kubernetes conditions and RFC 3339 times."""

from __future__ import annotations

from datetime import datetime, timezone

from .api import Condition


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def to_rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rfc3339(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def set_condition(
    conditions: list[Condition], *, type: str, status: str, reason: str, message: str = "",
    now: datetime, generation: int | None,
) -> list[Condition]:
    """Conditions with `type` set; lastTransitionTime changes only when status changes."""
    out, found = [], False
    for c in conditions:
        if c.type != type:
            out.append(c)
            continue
        found = True
        changed = c.status != status
        out.append(Condition(
            type=type, status=status, reason=reason, message=message,
            last_transition_time=to_rfc3339(now) if changed else c.last_transition_time,
            observed_generation=generation,
        ))
    if not found:
        out.append(Condition(type=type, status=status, reason=reason, message=message,
                             last_transition_time=to_rfc3339(now),
                             observed_generation=generation))
    return out


def get_condition(conditions: list[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)
