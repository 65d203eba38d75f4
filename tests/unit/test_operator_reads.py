"""Results of running stages are read off the round's path: a round never waits for them, a
found one wakes the run and is never read again, and a Job that ended is read in the round."""

from __future__ import annotations

import threading

import pytest

from merit_operator.fairpool import FairPool
from merit_operator.reads import BackgroundReads, running_prefixes
from meritrun.api import MeritRunStatus, PartitionStatus, StageStatus
from meritrun.artifacts import RunId, partition_prefix, plan_prefix
from meritrun.errors import ObjectNotFound
from meritrun.pipeline import JobObservation

RUN = RunId("demo", "u-1")


class CountingStore:
    """A store that counts reads per key and holds what `put` gave it."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.reads: dict[str, int] = {}
        self._lock = threading.Lock()

    def uri_for(self, key: str) -> str:
        return f"s3://bkt/{key}"

    def get_bytes(self, key: str) -> bytes:
        with self._lock:
            self.reads[key] = self.reads.get(key, 0) + 1
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key]


def drain(pool: FairPool) -> None:
    """Wait until the pool ran everything submitted so far (it serves one key in turn)."""
    pool.submit("drain", lambda: None).result(timeout=5)
    pool.shutdown()
    for thread in pool._threads:
        thread.join(timeout=5)


def status() -> MeritRunStatus:
    return MeritRunStatus(phase="Training", run_uid="u-1", profile=StageStatus(
        state="Running", attempt=1, job="demo-profile-a1"), partitions=[
        PartitionStatus(name=f"p{i}", index=i, sources=["s"], state="Running", attempt=1,
                        job=f"demo-p{i}-a1") for i in range(3)])


def test_only_stages_whose_job_is_active_are_read_in_the_background():
    jobs = {"demo-profile-a1": JobObservation("Active"), "demo-p0-a1": JobObservation("Active"),
            "demo-p1-a1": JobObservation("Succeeded")}  # p2's Job: not seen
    assert running_prefixes(status(), jobs, RUN) == {
        plan_prefix(RUN, 1), partition_prefix(RUN, "p0", 1)}
    assert running_prefixes(None, jobs, RUN) == frozenset()


def test_a_running_stages_result_is_read_once_in_the_background_then_kept():
    store, woken = CountingStore(), threading.Event()
    pool = FairPool(2)
    reads = BackgroundReads(pool, reread_seconds=30.0)
    key = f"{partition_prefix(RUN, 'p0', 1)}/manifest.json"
    view = reads.view(store, [partition_prefix(RUN, "p0", 1)], woken.set)
    with pytest.raises(ObjectNotFound):
        view.get_bytes(key)  # not known: the round goes on, a read goes out
    drain(pool)
    assert store.reads == {key: 1} and not woken.is_set()
    with pytest.raises(ObjectNotFound):
        view.get_bytes(key)  # asked again within reread_seconds: no second read
    assert store.reads == {key: 1}

    store.objects[key] = b'{"done": true}'
    pool = FairPool(2)
    reads = BackgroundReads(pool, reread_seconds=0.0)
    view = reads.view(store, [partition_prefix(RUN, "p0", 1)], woken.set)
    with pytest.raises(ObjectNotFound):
        view.get_bytes(key)
    drain(pool)
    assert woken.is_set()  # found: the run's next round takes it
    for _ in range(3):
        assert view.get_bytes(key) == b'{"done": true}'
    assert store.reads == {key: 2}  # kept: never read again


def test_other_keys_are_read_in_the_round():
    """A Job that ended, and what no running Job of ours produces, are read at once."""
    store = CountingStore()
    key = f"{partition_prefix(RUN, 'p1', 1)}/manifest.json"
    store.objects[key] = b"{}"
    reads = BackgroundReads(FairPool(1), reread_seconds=30.0)
    view = reads.view(store, [partition_prefix(RUN, "p10", 1)], None)  # not p1's prefix
    assert view.get_bytes(key) == b"{}" and view.get_bytes(key) == b"{}"
    assert store.reads == {key: 2}
    assert view.uri_for(key) == f"s3://bkt/{key}"


def test_a_failed_background_read_is_asked_again_by_the_next_round():
    from meritrun.errors import StorageError

    class Flaky(CountingStore):
        failed = False

        def get_bytes(self, key: str) -> bytes:
            if not self.failed:
                self.failed = True
                raise StorageError("HTTP 503: slow down")
            return super().get_bytes(key)

    store, woken = Flaky(), threading.Event()
    reads = BackgroundReads(FairPool(1), reread_seconds=30.0)
    key = f"{partition_prefix(RUN, 'p0', 1)}/manifest.json"
    store.objects[key] = b"{}"
    view = reads.view(store, [partition_prefix(RUN, "p0", 1)], woken.set)
    with pytest.raises(ObjectNotFound):
        view.get_bytes(key)  # fails in the background
    reads.pool.submit("x", lambda: None).result(timeout=5)
    with pytest.raises(ObjectNotFound):
        view.get_bytes(key)  # not 30 s later: now
    assert woken.wait(timeout=5) and view.get_bytes(key) == b"{}"
