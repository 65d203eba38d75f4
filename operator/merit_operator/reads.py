"""Storage reads a round does not wait for: the results of stages whose Job still runs.

A round reads a stage's result to decide (a partition's manifest, the plan, the merge report,
the search result). While the stage's Job is Active the result is almost never there (a stage
writes it last, then exits), yet each of those reads was a round trip to the store inside the
round, and on a loaded machine they were the rounds' p99. Now such a read goes out in the
background: the round decides from what is known (nothing yet: the Job keeps running and
nothing is decided on its account), and a read that finds the result keeps it and wakes the
run, whose next round takes it from here. A result is immutable once there: its key holds the
run's uid and the attempt, and the stage writes it last (write fencing), so what was found is
kept by key and never read again.

What this does not defer: the result of a Job that ended or vanished is read in the round, as
before ("succeeded but wrote no artifact" is decided only from a read made after the Job
ended); so is whatever no running Job of ours produces (a pull site's contribution, a verdict,
sketches). A key is read in the background at most once per `reread_seconds` (the first time
at once), so a burst of rounds costs one read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Executor
from typing import Any

from meritrun import artifacts
from meritrun.api import MeritRunStatus, StageStatus
from meritrun.artifacts import RunId
from meritrun.errors import MeritRunError, ObjectNotFound
from meritrun.pipeline import JobObservation

from .fairpool import FairPool

log = logging.getLogger(__name__)
KEPT_RESULTS = 1024  # found results kept (a few KiB each); a round uses one once
Wake = Callable[[], None]


def running_prefixes(status: MeritRunStatus | None, jobs: Mapping[str, JobObservation],
                     run: RunId) -> frozenset[str]:
    """Attempt prefixes of the stages whose current Job is seen Active: their results may
    come in the background."""
    if status is None:
        return frozenset()
    run = RunId(run.name, status.run_uid or run.uid)

    def active(stage: StageStatus | None) -> bool:
        seen = jobs.get(stage.job or "") if stage is not None else None
        return (stage is not None and stage.state == "Running" and stage.attempt >= 1
                and seen is not None and seen.state == "Active")

    out = [artifacts.partition_prefix(run, p.name, p.attempt)
           for p in status.partitions if active(p)]
    if status.plan is None and active(status.profile):
        out.append(artifacts.plan_prefix(run, status.profile.attempt))
    if active(status.merge):
        out.append(artifacts.merged_prefix(run, status.merge.attempt))
    if active(status.search):
        assert status.search is not None
        out.append(artifacts.search_prefix(run, status.search.attempt))
    return frozenset(out)


class BackgroundReads:
    """Results found in the background, by URI, and when each key was last asked for."""

    def __init__(self, pool: FairPool, *, reread_seconds: float,
                 on_read: Callable[[str], None] | None = None) -> None:
        self.pool, self.reread_seconds = pool, reread_seconds
        self.on_read = on_read or (lambda result: None)  # "found", "absent", "error"
        self._found: OrderedDict[str, bytes] = OrderedDict()
        self._asked: OrderedDict[str, float] = OrderedDict()  # uri -> last read started
        self._lock = threading.Lock()

    def view(self, storage: Any, prefixes: Iterable[str], wake: Wake | None, *,
             owner: Hashable = None) -> StorageView:
        """The storage as one run's round reads it; `owner` (the run) takes its turn in the
        pool, so a run's one read does not wait behind another run's many."""
        return StorageView(storage, self, frozenset(prefixes), wake, owner)

    def get(self, storage: Any, key: str, wake: Wake | None, owner: Hashable = None) -> bytes:
        """The result if found already; else ObjectNotFound, and a read goes out if due."""
        uri = storage.uri_for(key)
        now = time.monotonic()
        with self._lock:
            if uri in self._found:
                self._found.move_to_end(uri)
                return self._found[uri]
            last = self._asked.get(uri)
            due = last is None or now - last >= self.reread_seconds
            if due:
                self._asked.pop(uri, None)
                self._asked[uri] = now  # kept in the order asked: the oldest go first
                while len(self._asked) > 8 * KEPT_RESULTS:
                    self._asked.popitem(last=False)
        if due:
            try:
                self.pool.submit(owner, self._read, storage, key, uri, wake)
            except RuntimeError:  # the pool is shut down: the operator is stopping
                pass
        raise ObjectNotFound(f"{uri}: not read yet (read in the background)")

    def _read(self, storage: Any, key: str, uri: str, wake: Wake | None) -> None:
        try:
            data = storage.get_bytes(key)
        except ObjectNotFound:
            self.on_read("absent")
            return
        except MeritRunError as e:  # the next round asks again, not a resync later
            log.debug("background read of %s failed: %s", uri, str(e)[:300])
            with self._lock:
                self._asked.pop(uri, None)
            self.on_read("error")
            return
        with self._lock:
            self._found[uri] = data
            while len(self._found) > KEPT_RESULTS:
                self._found.popitem(last=False)
        self.on_read("found")
        if wake is not None:
            wake()


class StorageView:
    """A run's storage as its round reads it: keys under `prefixes` (stages whose Job runs)
    come from the background reads, every other key from the store itself."""

    def __init__(self, storage: Any, reads: BackgroundReads, prefixes: frozenset[str],
                 wake: Wake | None, owner: Hashable = None) -> None:
        self.storage, self.reads, self.prefixes, self.wake = storage, reads, prefixes, wake
        self.owner = owner

    def deferred(self, key: str) -> bool:
        return any(key.startswith(f"{prefix}/") for prefix in self.prefixes)

    def get_bytes(self, key: str) -> bytes:
        if self.deferred(key):
            return self.reads.get(self.storage, key, self.wake, self.owner)
        return self.storage.get_bytes(key)

    def fetcher(self, pool: Executor, run: RunId) -> Callable[..., Iterable[Any]]:
        """`observe_storage`'s fetch: the partitions' reads at once in `pool` when more than
        one goes to the store, else in the round's own thread (a deferred read is a lookup:
        no hop to another thread, whose pool may be busy)."""
        def fetch(fn: Callable[[Any], Any], parts: Iterable[Any]) -> Iterable[Any]:
            parts = list(parts)
            to_store = [p for p in parts if artifacts.partition_prefix(
                run, p.name, p.attempt) not in self.prefixes]
            return pool.map(fn, parts) if len(to_store) > 1 else map(fn, parts)
        return fetch

    def __getattr__(self, name: str) -> Any:  # uri_for and the rest: the store's own
        return getattr(self.storage, name)
