"""The driver's Backend for one round of one MeritRun on Kubernetes (`KubeRound`).

It observes (the run's Jobs from the watch's store, its storage through `reads`, its sites'
grants), carries out the pipeline's actions and keeps the decided status for the commit. A
round ends at its decision: its Job creations go to the creators' pool (per stage attempt
and cluster: the params ConfigMap, then its Jobs at once; each run in turn, `fairpool`),
and `commit` (in its own pool) waits for them, then writes the status, with `jobSeen` for
the Jobs it created and each running partition's progress. The round costs no API write
and, with the storage reads of running stages in the background, no wait on the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_all
from datetime import datetime
from typing import TYPE_CHECKING, Any

from meritrun.api import TERMINAL_PHASES, MeritRunSpec, MeritRunStatus
from meritrun.artifacts import RunId
from meritrun.driver import Failure
from meritrun.errors import MeritRunError, SpecError
from meritrun.observe import attach_progress, grant_candidates, observe_storage
from meritrun.pipeline import CreateJob, Event, Observed, OfferAssignment, RevokeGrant

from .manifests import RunRef
from .reads import running_prefixes
from .sources import storage_of
from .status import mark_seen

if TYPE_CHECKING:
    from .reconcile import Reconciler

log = logging.getLogger(__name__)


def _copy(source: Future[Any], target: Future[Any]) -> None:
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _failed(error: BaseException) -> Future[bool]:
    future: Future[bool] = Future()
    future.set_exception(error)
    return future


class KubeRound:
    """The driver's Backend for one round of one run (spec None: it does not validate)."""

    def __init__(self, rec: Reconciler, run: RunRef, spec: MeritRunSpec | None, *,
                 stored: MeritRunStatus | None, body: dict[str, Any],
                 spec_error: str | None) -> None:
        self.rec, self.run, self.spec, self.stored = rec, run, spec, stored
        self.key = (run.namespace, run.name)  # the run's turn in the creators' pool
        self.generation = body["metadata"].get("generation")
        self.spec_error = spec_error
        self.storage_spec = spec.storage if spec is not None else storage_of(body)
        self.events: list[Event] = []
        self._grants: Any = None
        self._pending: list[CreateJob] = []  # decided this round, not handed on yet
        self._lock = threading.Lock()
        self._outstanding = 1  # creations not ended, plus the round's own hold
        self._when_created: Callable[[], None] | None = None
        self._creating: list[tuple[list[CreateJob], Future[list[Future[bool]]]]] = []
        self.created: set[str] = set()  # Jobs new in this round (none can have run yet)
        self.exists: set[str] = set()  # Jobs this round created or adopted
        self.jobs: dict[str, Any] = {}  # the Jobs it observed
        self.failures: list[Failure] = []  # creations that failed
        self.status: MeritRunStatus | None = None  # decided; written by `commit`
        self.phases: dict[str, float] = {}  # seconds spent per phase (metrics)

    def timed(self, phase: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def grants(self) -> Any:
        """One grant keeper (and IAM client) per round, made only when a grant is touched."""
        if self._grants is None:
            if self.storage_spec is None:
                raise SpecError("no usable spec.storage: cannot reach the sites' grants",
                                path="spec.storage")
            self._grants = self.rec.grant_keeper(self.run, self.storage_spec)
        return self._grants

    def observe(self, spec: MeritRunSpec | None, status: MeritRunStatus | None,
                now: datetime) -> Observed:
        backend, name = self.rec.backend, self.run.name
        run_id = RunId(name, self.run.uid)  # the status's runUid once it has one (resets)
        jobs = self.timed("jobs", backend.observe_jobs, self.run, spec)
        self.jobs = jobs
        found: dict[str, Any] = {}
        if spec is not None and (status is None or status.phase not in TERMINAL_PHASES):
            # Results of stages whose Job runs come in the background (`reads`).
            view = self.rec.reads.view(self.rec.storages.for_spec(spec),  # first: ~1 s
                                       running_prefixes(status, jobs, run_id), self.wake,
                                       owner=self.key)
            results = RunId(name, (status.run_uid if status else None) or self.run.uid)
            found = self.timed("storage", observe_storage, view, run_id, status,
                               fetch=view.fetcher(self.rec.readers, results))
        candidates = grant_candidates(spec, status, found.get("plan"))
        held = self.timed("grants", self.grants().held, name, candidates) if candidates else {}
        return Observed(run=run_id, now=now, generation=self.generation, jobs=jobs,
                        grants=held, spec_error=self.spec_error, **found)

    def wake(self) -> None:
        """A result this round asked for has come: the run's next round takes it."""
        if self.rec.wake is not None:
            self.rec.wake(self.run.namespace, self.run.name)

    def create_job(self, action: CreateJob) -> None:
        """Collected; `start_creates` hands the round's creations to the pool at its end."""
        assert self.spec is not None  # decide creates nothing for an invalid spec
        self._pending.append(action)

    def start_creates(self) -> None:
        """Per stage attempt and cluster: its params ConfigMap, then its Jobs all at once (in
        the creators' pool; the commit waits for them)."""
        groups: dict[tuple[str | None, str, int], list[CreateJob]] = {}
        for action in self._pending:
            groups.setdefault((action.cluster, action.stage, action.attempt), []).append(action)
        self._pending = []
        for group in groups.values():
            self._hold()
            started = self.rec.creator.submit(self.key, self._create_group, group)
            self._creating.append((group, started))
            started.add_done_callback(self._group_started)

    def _create_group(self, group: list[CreateJob]) -> list[Future[bool]]:
        """In a creator's thread: the params, then each Job back to the pool (in the run's
        turn again), not waited for here."""
        backend = self.rec.backend
        backend.create_params(group, run=self.run, spec=self.spec)
        return [self.rec.creator.submit(self.key, backend.create_job, action, run=self.run,
                                        spec=self.spec) for action in group]

    def commit_when_created(self, pool: Executor) -> Future[list[Failure]]:
        """The commit, handed to `pool` once every creation of the round has ended: no
        thread of the pool waits for creations (blocked commits of other runs would hold
        them all, and a run whose commit is only its status write would queue behind)."""
        outcome: Future[list[Failure]] = Future()

        def run_commit() -> None:
            try:
                inner = pool.submit(self.commit)
            except RuntimeError as e:  # the pool is shut down: the operator is stopping
                outcome.set_exception(e)
                return
            inner.add_done_callback(lambda done: _copy(done, outcome))

        self._when_created = run_commit
        self._release()  # the round's own hold: its creations are all handed on
        return outcome

    def _group_started(self, started: Future[list[Future[bool]]]) -> None:
        if not started.cancelled() and started.exception() is None:
            for future in started.result():
                self._hold()
                future.add_done_callback(lambda _: self._release())
        self._release()

    def _hold(self) -> None:
        with self._lock:
            self._outstanding += 1

    def _release(self) -> None:
        then = None
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:  # every creation ended, and the round handed on
                then, self._when_created = self._when_created, None
        if then is not None:
            then()

    def finish_creates(self) -> None:
        """Wait for every creation of this round; an expected error becomes the action's
        failure (the round is retried, as the driver does for its own actions)."""
        self.start_creates()  # those of a round that ended before handing them on
        creating, self._creating = self._creating, []
        for group, started in creating:
            try:
                futures = started.result()
            except MeritRunError as e:  # the params: none of the group's Jobs was created
                futures = [_failed(e)] * len(group)
            wait_all(futures)
            for action, future in zip(group, futures, strict=True):
                try:
                    new = future.result()
                except MeritRunError as e:
                    log.warning("run %s: CreateJob %s failed: %s", self.run.name, action.name,
                                str(e)[:300])
                    self.failures.append(Failure(action, e))
                    continue
                self.exists.add(action.name)
                if new:
                    self.created.add(action.name)
                    self.rec.metrics.job_created(action.stage)

    def delete_job(self, name: str, cluster: str | None) -> None:
        self.rec.backend.delete_job(name, run=self.run, spec=self.spec, cluster=cluster)

    def offer_grant(self, action: OfferAssignment) -> None:
        if self.grants().offer(action):
            self.rec.metrics.grant_issued()

    def revoke_grant(self, action: RevokeGrant) -> None:
        self.grants().revoke(action)

    def post_event(self, event: Event) -> None:
        self.events.append(event)  # posted by the async handler, with kopf

    def write_status(self, status: MeritRunStatus) -> None:
        self.status = status  # the commit writes it, once this round's creations have ended

    def commit(self) -> list[Failure]:
        """The round's writes, in order: wait for its creations, then the status (with each
        running partition's progress, shown and never decided on). The creations that
        failed; the next round creates them again."""
        start = time.perf_counter()
        self.finish_creates()
        status = self.status
        if status is not None:
            mark_seen(status, self.exists)
            if self.spec is not None and status.phase not in TERMINAL_PHASES:
                # step, total and loss of each training partition, for `kubectl get -o
                # yaml`; a Job whose pod has not started (created just now, or waiting for a
                # node) is queued, and its progress.json is not read
                queued = self.created | self.rec.backend.unstarted(self.run, self.jobs)
                attach_progress(self.rec.storages.for_spec(self.spec), RunId(
                    self.run.name, self.run.uid), status, queued=frozenset(queued))
            self.rec.write(self.run, self.stored, status)
        self.rec.metrics.committed(time.perf_counter() - start)
        return self.failures
