"""One reconcile round of one MeritRun: read, observe, decide, act, write the status.

Level-based: the round reads the run fresh from the API (never a cached body), observes its
Jobs and its storage, and asks `meritrun.pipeline.decide` what to do, so it converges from
whatever state it finds. Actions run before the status is written: if the operator dies in
between, the next round decides the same actions again and they are idempotent (deterministic
names, 409 adopted). Blocking: the handlers run it in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from meritrun.api import TERMINAL_PHASES, MeritRunSpec
from meritrun.conditions import now_utc
from meritrun.errors import SpecError
from meritrun.jobs import CreateJob
from meritrun.observe import observe_storage
from meritrun.pipeline import (
    DeleteJob,
    Event,
    Observed,
    OfferAssignment,
    Policy,
    RevokeGrant,
    decide,
)

from .backend import KubeBackend
from .manifests import RunRef
from .metrics import Metrics
from .settings import Settings
from .status import (
    already_reported,
    failed_for_spec,
    invalid_spec_status,
    merge_patch,
    next_delay,
    parse_status,
    validated_spec,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """What a round leaves for the handler: events to post and when to look again."""

    events: tuple[Event, ...] = ()
    phase: str | None = None
    delay_seconds: float | None = None
    ref: dict[str, Any] | None = None  # the run, for posting events
    gone: bool = False
    invalid: str | None = None  # the InvalidSpec verdict, for kopf's PermanentError
    error: BaseException | None = None  # set by the caller when the round raised


class StorageCache:
    """One Storage per (root, endpoint, region); the operator's own S3 keys come from env."""

    def __init__(self) -> None:
        self._open: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def for_spec(self, spec: MeritRunSpec) -> Any:
        from meritrun.storage import open_storage

        assert spec.storage is not None
        key = (spec.storage.root_uri(), spec.storage.endpoint, spec.storage.region)
        with self._lock:
            if key not in self._open:
                self._open[key] = open_storage(key[0], endpoint=key[1], region=key[2])
            return self._open[key]


def event_ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")}}


class Reconciler:
    def __init__(self, backend: KubeBackend, *, settings: Settings, metrics: Metrics,
                 storages: StorageCache | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.storages = storages or StorageCache()
        self.policy = Policy(backoff_base_seconds=settings.backoff_base_seconds,
                             backoff_max_seconds=settings.backoff_max_seconds)

    def round(self, namespace: str, name: str, *, now: datetime | None = None) -> RoundOutcome:
        body = self.backend.get_run(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return RoundOutcome(gone=True)
        now = now or now_utc()
        meta = body["metadata"]
        run = RunRef(name=name, namespace=namespace, uid=meta["uid"])
        generation = meta.get("generation")
        stored = old = parse_status(body.get("status"))
        if failed_for_spec(old) and old is not None and old.observed_generation != generation:
            log.info("run %s/%s: spec changed after InvalidSpec; starting over", namespace, name)
            old = None
        try:
            spec = validated_spec(body)
        except SpecError as e:
            return self._invalid(body, run, old, e, stored=stored, now=now,
                                 generation=generation)
        if old is not None and old.phase in TERMINAL_PHASES:
            self.metrics.set_phase(run.uid, old.phase)
            return self._outcome(body, old, (), now)
        storage = self.storages.for_spec(spec)
        observed = Observed(run=name, now=now, generation=generation,
                            jobs=self.backend.observe_jobs(run, spec),
                            **observe_storage(storage, name, old))
        decision = decide(spec, old, observed, policy=self.policy)
        grants = None
        for action in decision.actions:
            if isinstance(action, CreateJob):
                if self.backend.create_job(action, run=run, spec=spec):
                    self.metrics.job_created(action.stage)
            elif isinstance(action, DeleteJob):
                self.backend.delete_job(action.name, run=run, spec=spec)
            elif isinstance(action, OfferAssignment | RevokeGrant):
                grants = grants or self._grants(run, spec, storage)  # one per round, if any
                if isinstance(action, RevokeGrant):
                    grants.revoke(action)
                elif grants.offer(action):
                    self.metrics.grant_issued()
        self._write(run, stored, decision.status)
        return self._outcome(body, decision.status, decision.events, now)

    def _grants(self, run: RunRef, spec: MeritRunSpec, storage: Any) -> Any:
        from meritrun.grants import GrantKeeper, issuer_from_env

        from .grants import SecretGrantStore

        assert spec.storage is not None
        issuer = issuer_from_env(storage, endpoint=spec.storage.endpoint,
                                 region=spec.storage.region)
        return GrantKeeper(storage, issuer, SecretGrantStore(self.backend.api, run),
                           endpoint=self.settings.site_endpoint or spec.storage.endpoint)

    def _invalid(self, body: dict[str, Any], run: RunRef, old: Any, error: SpecError, *,
                 stored: Any, now: datetime, generation: int | None) -> RoundOutcome:
        self.metrics.set_phase(run.uid, "Failed")
        if already_reported(old, error, generation):
            return RoundOutcome(phase="Failed", delay_seconds=self.settings.idle_resync_seconds,
                                invalid=str(error))
        log.warning("run %s/%s: invalid spec: %s", run.namespace, run.name, error)
        new = invalid_spec_status(old, error, now=now, generation=generation)
        self._write(run, stored, new)
        # An invalid edit of a running run: its Jobs would train what is no longer asked for.
        self.backend.delete_children(run, None)
        event = Event("Warning", "InvalidSpec", str(error))
        return replace(self._outcome(body, new, (event,), now), invalid=str(error))

    def _write(self, run: RunRef, stored: Any, new: Any) -> None:
        """Patch from what is stored (not what was decided from) so nothing stale survives."""
        old = stored
        patch = merge_patch(old.to_wire() if old else {}, new.to_wire())
        if patch:
            self.backend.patch_status(run.namespace, run.name, patch)
        self.metrics.record_transition(old, new)
        self.metrics.set_phase(run.uid, new.phase)

    def _outcome(self, body: dict[str, Any], status: Any, events: Any,
                 now: datetime) -> RoundOutcome:
        delay = next_delay(status, now=now, resync_seconds=self.settings.resync_seconds,
                           idle_seconds=self.settings.idle_resync_seconds)
        return RoundOutcome(tuple(events), status.phase, delay, event_ref(body))

    def cleanup(self, body: dict[str, Any]) -> int:
        """The finalizer's work: children always, artifacts only when spec.deleteArtifacts."""
        meta = body["metadata"]
        run = RunRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        try:
            spec: MeritRunSpec | None = validated_spec(body)
        except SpecError:
            spec = None  # nothing was started for an invalid spec on a remote site
        deleted = self.backend.delete_children(run, spec)
        if spec is not None and spec.storage is not None:
            self._revoke_all(run, spec, body.get("status"))
        if spec is not None and spec.delete_artifacts:
            from meritrun.artifacts import run_prefix

            self.storages.for_spec(spec).delete_prefix(run_prefix(run.name))
            log.info("run %s/%s: deleted its artifacts", run.namespace, run.name)
        self.metrics.forget(run.uid)
        return deleted

    def _revoke_all(self, run: RunRef, spec: MeritRunSpec, raw_status: Any) -> None:
        """A deleted run's sites lose their access at once (their Secrets go with the run)."""
        from meritrun.contributions import grants_to_revoke

        status = parse_status(raw_status)
        if status is None:
            return
        actions = grants_to_revoke(run.name, spec, status)
        if actions:
            grants = self._grants(run, spec, self.storages.for_spec(spec))
            for action in actions:
                grants.revoke(action)
