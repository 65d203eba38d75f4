"""One reconcile round of one MeritRun: the Kubernetes adapter of `meritrun.driver`.

Level-based: the driver observes (its Jobs on every cluster, its storage, its sites' grants),
decides, acts and writes the status last, so it converges from whatever state it finds; if
the operator dies in between, the next round decides the same actions again and they are
idempotent (deterministic names, 409 adopted). An invalid spec is an observation like any
other: the pipeline fails the run, stops its Jobs and revokes its grants through the same code.
Blocking: the handlers run it in a worker thread.

Reads come from watch-fed caches, not a GET and LIST per round: the run is kopf's live body
(or our own last status write, when that is newer by resourceVersion), its Jobs are the Job
watch's store (`jobwatch`). Without a body (a caller outside kopf) the run is read fresh.

A round ends at its decision: its Job creations go to a shared pool and the status write
waits for them in a commit (`KubeRound.commit`, in its own pool), so "actions before the
status" holds while the round itself costs no API write. The next round of the same run
starts only after that commit has ended (`OperatorContext` waits for it under the run's
lock), so it decides from the status the commit wrote. Concurrency cannot duplicate a Job:
rounds of one run never overlap, the Jobs of one round have distinct deterministic names,
and a 409 is adopted as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meritrun.api import MeritRunSpec, MeritRunStatus, StorageSpec
from meritrun.artifacts import RunId, run_prefix
from meritrun.conditions import now_utc
from meritrun.driver import ActionsFailed, Failure, run_round
from meritrun.errors import SpecError
from meritrun.observe import grant_candidates
from meritrun.pipeline import (
    Event,
    Policy,
    RevokeGrant,
)

from .backend import KubeBackend
from .fairpool import FairPool
from .kuberound import KubeRound
from .manifests import RunRef
from .metrics import Metrics
from .reads import BackgroundReads
from .settings import Settings
from .sources import StorageCache, newest, storage_of
from .status import merge_patch, next_delay, parse_status, validated_spec

log = logging.getLogger(__name__)
READ_THREADS = 8


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
    commit: Future[list[Failure]] | None = None  # the round's creations and status write


def results_uids(storage: Any, name: str, uid: str) -> list[str]:
    """The result uids of one MeritRun object in storage: its uid and its resets' uids."""
    found = {key.split("/")[2] for key in storage.list_keys(f"runs/{name}")
             if key.count("/") >= 3}
    return sorted(u for u in found if u == uid or u.startswith(f"{uid}-g"))


def event_ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")}}


class Reconciler:
    def __init__(self, backend: KubeBackend, *, settings: Settings, metrics: Metrics,
                 storages: StorageCache | None = None, creator: FairPool | None = None,
                 committer: Executor | None = None, readers: Executor | None = None,
                 background: FairPool | None = None) -> None:
        self.backend = backend
        self.creator = creator or FairPool(settings.create_threads, name="create")
        self.committer = committer or ThreadPoolExecutor(max(settings.create_threads, 1),
                                                         thread_name_prefix="commit")
        # A round's storage reads (one per partition whose Job ended) at once: a partition's
        # result is one round trip to the store, and a run has up to 64 partitions.
        self.readers = readers or ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read")
        # Results of running stages, read off the round's path (`reads`); a found one wakes
        # the run through `wake` (the operator's event loop; None: the next round finds it).
        self.reads = BackgroundReads(
            background or FairPool(READ_THREADS, name="bgread"),
            reread_seconds=settings.resync_seconds, on_read=metrics.background_read)
        self.wake: Callable[[str, str], None] | None = None
        self.settings = settings
        self.metrics = metrics
        self.storages = storages or StorageCache()
        self.policy = Policy(backoff_base_seconds=settings.backoff_base_seconds,
                             backoff_max_seconds=settings.backoff_max_seconds)
        self._written: dict[tuple[str, str], dict[str, Any]] = {}  # last status write, per run

    def current_body(self, namespace: str, name: str,
                     seen: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The run as a round reads it: from the caches, else a GET (None: gone)."""
        body = newest(seen, self._written.get((namespace, name)))
        return body if body is not None else self.backend.get_run(namespace, name)

    def round(self, namespace: str, name: str, *, body: Mapping[str, Any] | None = None,
              now: datetime | None = None) -> RoundOutcome:
        """Observe and decide; the outcome's `commit` carries the creations and the status
        write (running in the committers' pool)."""
        start, cpu = time.perf_counter(), time.thread_time()
        current = self.current_body(namespace, name, body)
        read = time.perf_counter() - start
        if current is None or current["metadata"].get("deletionTimestamp"):
            return RoundOutcome(gone=True)
        meta = current["metadata"]
        run = RunRef(name=name, namespace=namespace, uid=meta["uid"])
        stored = parse_status(current.get("status"))
        spec, error = None, None
        try:
            spec = validated_spec(current)
        except SpecError as e:
            error = str(e)
            log.warning("run %s/%s: invalid spec: %s", namespace, name, error)
        kube = KubeRound(self, run, spec, stored=stored, body=current, spec_error=error)
        kube.phases["run"] = read
        now = now or now_utc()
        failed: ActionsFailed | None = None
        commit: Future[list[Failure]] | None = None
        try:
            decision = run_round(kube, spec, stored, now=now, policy=self.policy)
        except ActionsFailed as e:
            decision, failed = e.decision, e
        finally:  # a round that raised still hands its creations to a commit to wait for
            kube.start_creates()
            commit = kube.commit_when_created(self.committer)
            self.metrics.round_phases(kube.phases, time.perf_counter() - start,
                                      time.thread_time() - cpu)
        status = decision.status
        delay = next_delay(status, requeue_after=decision.requeue_after,
                           resync_seconds=self.settings.resync_seconds,
                           idle_seconds=self.settings.idle_resync_seconds)
        if failed is not None:
            delay = min(delay, self.settings.error_backoff_seconds)
        return RoundOutcome(tuple(kube.events), status.phase, delay, event_ref(current),
                            invalid=error, error=failed, commit=commit)

    def grant_keeper(self, run: RunRef, storage_spec: StorageSpec) -> Any:
        from meritrun.access import GrantKeeper
        from meritrun.iam import issuer_from_env

        from .grants import SecretGrantStore

        storage = self.storages.for_storage(storage_spec)
        issuer = issuer_from_env(storage, endpoint=storage_spec.endpoint,
                                 region=storage_spec.region)
        return GrantKeeper(storage, issuer, SecretGrantStore(self.backend.api, run),
                           endpoint=self.settings.site_endpoint or storage_spec.endpoint)

    def write(self, run: RunRef, stored: Any, new: Any) -> None:
        """Patch from what is stored (not what was decided from) so nothing stale survives."""
        old = stored
        patch = merge_patch(old.to_wire() if old else {}, new.to_wire())
        if patch:
            written = self.backend.patch_status(run.namespace, run.name, patch)
            if written is not None:  # the next round reads this, if kopf has not seen it yet
                self._written[(run.namespace, run.name)] = written
        self.metrics.record_transition(old, new)
        self.metrics.set_phase(run.uid, new.phase)

    def cleanup(self, body: dict[str, Any]) -> int:
        """The finalizer's work: children always, artifacts only when spec.deleteArtifacts."""
        meta = body["metadata"]
        run = RunRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        try:
            spec: MeritRunSpec | None = validated_spec(body)
        except SpecError:
            spec = None  # nothing was started for an invalid spec on a remote site
        deleted = self.backend.delete_children(run, spec)
        storage_spec = spec.storage if spec is not None else storage_of(body)
        if storage_spec is not None:
            self._revoke_all(run, spec, storage_spec, parse_status(body.get("status")))
        if spec is not None and spec.delete_artifacts:
            # This object's results only (<uid> and its resets <uid>-g<n>), never those of
            # an earlier run of the same name.
            storage = self.storages.for_spec(spec)
            for uid in results_uids(storage, run.name, run.uid):
                storage.delete_prefix(run_prefix(RunId(run.name, uid)))
            log.info("run %s/%s: deleted its artifacts", run.namespace, run.name)
        self.metrics.forget(run.uid)
        self._written.pop((run.namespace, run.name), None)
        return deleted

    def _revoke_all(self, run: RunRef, spec: MeritRunSpec | None, storage_spec: StorageSpec,
                    status: MeritRunStatus | None) -> None:
        """A deleted run's sites lose their access at once: every grant the store still
        keeps, whatever the status says (their Secrets go with the run)."""
        candidates = grant_candidates(spec, status)
        if not candidates:
            return
        grants = self.grant_keeper(run, storage_spec)
        for ref in grants.held(run.name, candidates).values():
            grants.revoke(RevokeGrant(ref))
