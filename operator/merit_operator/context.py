"""The operator's runtime: one object built at startup and shared by every handler.

It owns the API client, the reconciler, the metrics and the worker threads, and it
serializes rounds per run (a lock each), so the daemon, the create/update/resume fast paths
and Job events never decide on the same run at once. It also coalesces requests for rounds:
a request carries a ticket (the run's count of requests so far), and a round records the
count when it starts; a request whose ticket a later-started round already covers gets that
round's outcome instead of a round of its own (a round reads the caches as of its start, and
they held what the request was about before it was made). Fifty Job events of one run during
a round cost one more round, not fifty. A round ends at its decision and leaves a commit
(its Job creations, then its status write) running in a pool; the run's next round waits for
that commit first, so it never decides from a status older than its own last write. Errors
are translated here: expected MeritRunErrors back off per run (doubling up to a cap), a
commit's failures too (the run is woken again after the backoff); anything else is a bug and
is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from meritrun.errors import MeritRunError

from .backend import KubeBackend
from .fairpool import FairPool
from .jobwatch import JobCache, start_job_watches
from .kubeapi import ApiConfig, KubeApi
from .manifests import Images
from .metrics import Metrics, error_kind
from .reconcile import READ_THREADS, Reconciler, RoundOutcome
from .settings import Settings

log = logging.getLogger(__name__)
Key = tuple[str, str]


def api_config(settings: Settings) -> ApiConfig:
    if settings.kubeconfig:
        return ApiConfig.from_kubeconfig(settings.kubeconfig)
    return ApiConfig.in_cluster()


def started(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A pool whose threads are all running already: a pool starts a thread on demand, in
    `submit`, and waits until the new thread runs; on a busy machine that wait (tens to
    hundreds of milliseconds) would land inside a round."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix)
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(barrier.wait)  # busy until all have started: each submit starts one
    barrier.wait(timeout=60)
    return pool


class OperatorContext:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(process_collectors=True)
        workers, creators = max(settings.workers, 1), max(settings.create_threads, 1)
        # A connection for every thread that may call at once (rounds, creations, commits,
        # the Job watch, grants): beyond its size urllib3 opens throwaway connections, a TLS
        # handshake each.
        self.api = KubeApi(api_config(settings), pool_size=workers + 2 * creators + 4,
                           token_reread_seconds=settings.token_reread_seconds)
        images = Images(trainer=settings.trainer_image, merger=settings.merger_image,
                        python=settings.job_python, rendezvous_port=settings.rendezvous_port)
        self.creator = FairPool(creators, name="create")  # each run in turn
        # A commit mostly waits for its creations, then writes: as many as creations at once.
        self.committer = started(creators, "commit")
        self.readers = started(READ_THREADS, "read")
        self.background = FairPool(READ_THREADS, name="bgread")  # results of running stages
        self.reconciler = Reconciler(KubeBackend(self.api, images=images), settings=settings,
                                     metrics=self.metrics, creator=self.creator,
                                     committer=self.committer, readers=self.readers,
                                     background=self.background)
        self.executor = started(workers, "reconcile")
        self._locks: dict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._wakers: dict[Key, asyncio.Event] = defaultdict(asyncio.Event)
        self._error_delay: dict[Key, float] = {}
        self._requested: dict[Key, int] = {}  # requests for a round so far, per run
        self._covered: dict[Key, int] = {}  # requests the latest round (at its start) covers
        self._last: dict[Key, tuple[float, RoundOutcome]] = {}  # its outcome, and when
        self._commits: dict[Key, Future[Any]] = {}  # the latest round's commit, per run
        self._generations: dict[Key, Any] = {}  # the latest spec generation seen, per run
        self._metrics_server: Any = None
        self._stopping = threading.Event()
        self.job_cache: JobCache | None = None

    def serve_metrics(self) -> None:
        if not self.settings.metrics_port:
            return
        from prometheus_client import start_http_server

        self._metrics_server, _ = start_http_server(
            self.settings.metrics_port, addr=self.settings.metrics_address,
            registry=self.metrics.registry)
        log.info("metrics on %s:%d", self.settings.metrics_address, self.settings.metrics_port)

    def watch_jobs(self) -> None:
        """Start the server-side filtered Job watch; it wakes runs on this event loop."""
        loop = asyncio.get_running_loop()

        def wake(namespace: str, name: str) -> None:
            loop.call_soon_threadsafe(self.wake, namespace, name)

        self.job_cache = start_job_watches(self.api, self.settings.namespaces, wake,
                                           self._stopping)
        self.reconciler.wake = wake  # a result read in the background wakes its run too
        self.reconciler.backend.jobs = self.job_cache  # rounds read their Jobs from it

    def close(self) -> None:
        self._stopping.set()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.committer.shutdown(wait=False, cancel_futures=True)
        self.creator.shutdown(cancel_futures=True)
        self.readers.shutdown(wait=False, cancel_futures=True)
        self.background.shutdown(cancel_futures=True)

    async def blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def waker(self, namespace: str, name: str) -> asyncio.Event:
        return self._wakers[(namespace, name)]

    def request(self, namespace: str, name: str) -> int:
        """Ask for a round that starts from now on; the ticket to pass to `reconcile`."""
        key = (namespace, name)
        self._requested[key] = self._requested.get(key, 0) + 1
        return self._requested[key]

    def requested(self, namespace: str, name: str) -> int:
        """The ticket covering every request so far (the daemon's, after a wake-up)."""
        return self._requested.get((namespace, name), 0)

    def wake(self, namespace: str, name: str) -> None:
        """Something changed (a Job event): the daemon runs a round that starts after this."""
        waker = self._wakers.get((namespace, name))  # no daemon yet: it starts with a round
        if waker is not None:
            self.request(namespace, name)
            waker.set()

    def new_generation(self, namespace: str, name: str, generation: Any) -> bool:
        """Whether the run's spec changed since the last call (its first: False)."""
        key = (namespace, name)
        last = self._generations.get(key)
        self._generations[key] = generation
        return last is not None and last != generation

    def replan(self, namespace: str, name: str) -> None:
        """A fast path ran a round: the daemon re-plans its sleep from that round's outcome
        (its request is covered, so it runs no round of its own)."""
        waker = self._wakers.get((namespace, name))
        if waker is not None:
            waker.set()

    def forget(self, namespace: str, name: str) -> None:
        for table in (self._wakers, self._locks, self._error_delay, self._requested,
                      self._covered, self._last, self._commits, self._generations):
            table.pop((namespace, name), None)

    async def reconcile(self, handler: str, namespace: str, name: str,
                        ticket: int | None = None, *,
                        body: Mapping[str, Any] | None = None) -> RoundOutcome:
        """One serialized round (or, for a ticket a newer round covers, that round's outcome);
        expected errors become a backoff delay, not an exception. `body`: kopf's live view of
        the run, which the round reads instead of a GET."""
        key, asked = (namespace, name), time.perf_counter()
        async with self._locks[key]:
            if self._stopping.is_set():  # kopf's cleanup ran while a daemon was still here:
                return RoundOutcome(gone=True)  # no new round; the next operator resumes
            if ticket is not None and self._covered.get(key, 0) >= ticket and key in self._last:
                self.metrics.handled(handler, time.perf_counter() - asked, coalesced=True)
                return self._latest(key)
            await self._settled(key)
            self._covered[key] = self._requested.get(key, 0)
            outcome = await self._guarded_round(handler, key, body)
            self._last[key] = (time.monotonic(), outcome)
            if outcome.commit is not None:
                self._track(key, handler, outcome.commit)
        self.metrics.handled(handler, time.perf_counter() - asked, coalesced=False)
        return outcome

    async def _settled(self, key: Key) -> None:
        """Wait for the run's previous commit (its failures were handled by `_committed`)."""
        commit = self._commits.get(key)
        if commit is not None and not commit.done():
            try:
                await asyncio.wrap_future(commit)
            except Exception:  # noqa: BLE001, S110 - reported by `_committed`, not here
                pass

    def _track(self, key: Key, handler: str, commit: Future[Any]) -> None:
        self._commits[key] = commit
        loop = asyncio.get_running_loop()

        def ended(done: Future[Any]) -> None:
            if not loop.is_closed():  # the operator stopped meanwhile: nothing to retry
                loop.call_soon_threadsafe(self._committed, key, handler, done)

        commit.add_done_callback(ended)

    def _committed(self, key: Key, handler: str, commit: Future[Any]) -> None:
        """A commit ended: if a creation or the status write failed, log it, count it and
        wake the run after the backoff (its next round tries again)."""
        if commit.cancelled() or self._stopping.is_set():
            return
        error = commit.exception()
        failures = [] if error is not None else commit.result()
        if error is None and not failures:
            return
        kind = error_kind(error) if error is not None else "api"
        self.metrics.reconcile_errors.labels(handler=handler, kind=kind).inc()
        delay = self._backoff(key)
        what = str(error) if error is not None else "; ".join(str(f) for f in failures)
        if error is not None and not isinstance(error, MeritRunError):
            log.error("run %s/%s: commit failed (retry in %.1fs)", *key, delay,
                      exc_info=error)
        else:
            log.warning("run %s/%s: %s (retry in %.1fs)", *key, what[:300], delay)
        asyncio.get_running_loop().call_later(delay, self.wake, *key)

    async def _guarded_round(self, handler: str, key: Key,
                             body: Mapping[str, Any] | None) -> RoundOutcome:
        namespace, name = key
        try:
            outcome = await self.blocking(self._timed_round, handler, namespace, name, body)
        except MeritRunError as e:
            delay = self._backoff(key)
            log.warning("run %s/%s: %s (retry in %.1fs)", namespace, name, str(e)[:300], delay)
            return RoundOutcome(delay_seconds=delay, error=e)
        except Exception as e:  # noqa: BLE001 - a bug; keep serving the other runs
            delay = self._backoff(key)
            log.exception("run %s/%s: reconcile failed (retry in %.1fs)", namespace, name,
                          delay)
            return RoundOutcome(delay_seconds=delay, error=e)
        self._error_delay.pop(key, None)
        return outcome

    def _latest(self, key: Key) -> RoundOutcome:
        """The newest round's outcome, its events already posted, its delay counted from
        its end."""
        ended, outcome = self._last[key]
        delay = outcome.delay_seconds
        if delay is not None:
            delay = max(delay - (time.monotonic() - ended), 0.0)
        return replace(outcome, events=(), delay_seconds=delay)

    async def cleanup(self, namespace: str, name: str, body: dict[str, Any]) -> int:
        """The finalizer's work under the run's lock, so no round creates a Job meanwhile
        (a round that waited for the lock then sees the deletionTimestamp and stops), and
        after the last round's commit (its creations have ended: none outlives cleanup)."""
        async with self._locks[(namespace, name)]:
            await self._settled((namespace, name))
            with self.metrics.round("delete"):
                return await self.blocking(self.reconciler.cleanup, body)

    def _timed_round(self, handler: str, namespace: str, name: str,
                     body: Mapping[str, Any] | None) -> RoundOutcome:
        # Timed in the worker thread: the histogram shows the round, not its wait for a thread.
        with self.metrics.round(handler):
            if body is None:
                return self.reconciler.round(namespace, name)
            return self.reconciler.round(namespace, name, body=body)

    def _backoff(self, key: Key) -> float:
        s = self.settings
        delay = self._error_delay.get(key, s.error_backoff_seconds / 2) * 2
        delay = min(delay, s.error_backoff_max_seconds)
        self._error_delay[key] = delay
        return delay
