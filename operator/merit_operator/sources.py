"""What a round reads besides its children: the run's body, and its storage.

The body is kopf's live view of the run (its watch keeps it fresh) or the object our own last
status write returned, whichever is newer: kopf may not have seen our write yet when the
run's next round starts, and deciding from the older status would repeat the last round's
decisions. Storage clients are opened once per (root, endpoint, region).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

from meritrun.api import MeritRunSpec, StorageSpec


class StorageCache:
    """One Storage per (root, endpoint, region); the operator's own S3 keys come from env."""

    def __init__(self) -> None:
        self._open: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def for_spec(self, spec: MeritRunSpec) -> Any:
        assert spec.storage is not None
        return self.for_storage(spec.storage)

    def for_storage(self, storage: StorageSpec) -> Any:
        from meritrun.storage import open_storage

        key = (storage.root_uri(), storage.endpoint, storage.region)
        with self._lock:
            if key not in self._open:
                self._open[key] = open_storage(key[0], endpoint=key[1], region=key[2])
            return self._open[key]


def storage_of(body: dict[str, Any]) -> StorageSpec | None:
    """The storage section alone, when the rest of an invalid spec does not validate: enough
    to reach the sites' grants and revoke them."""
    raw = (body.get("spec") or {}).get("storage")
    if not isinstance(raw, dict):
        return None
    try:
        storage = StorageSpec.model_validate(raw)
        storage.root_uri()
    except ValueError:
        return None
    return storage


def newest(seen: Mapping[str, Any] | None,
           written: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newer of kopf's live body and our own last status write (by resourceVersion, which
    the API server hands out in increasing order), copied; None when it cannot tell (no body,
    or a version that is not a number): then the round reads the run fresh."""
    if seen is None:
        return None
    meta = seen.get("metadata") or {}
    candidates = [dict(seen)]
    if written is not None and (written.get("metadata") or {}).get("uid") == meta.get("uid"):
        candidates.append(written)
    try:
        best = max(candidates, key=lambda b: int(b["metadata"]["resourceVersion"]))
    except (KeyError, TypeError, ValueError):
        return None
    return copy.deepcopy(best)
