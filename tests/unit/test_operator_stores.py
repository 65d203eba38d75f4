"""The Job store shows our own creations before their watch events (a round after a commit
must see the Jobs it created: their status says jobSeen), and never brings back a Job the
stream has seen deleted."""

from __future__ import annotations

from merit_operator.manifests import LABEL_RUN
from merit_operator.watchstore import WatchStore


def job(name: str, version: int) -> dict:
    return {"metadata": {"name": name, "namespace": "ml", "resourceVersion": str(version),
                         "labels": {LABEL_RUN: "demo"}}}


class ListingApi:
    def __init__(self, items: list[dict], version: int) -> None:
        self.listed = {"items": items, "metadata": {"resourceVersion": str(version)}}

    def request(self, method: str, path: str, **_: object) -> dict:
        return self.listed


def names(store: WatchStore) -> list[str]:
    return sorted(o["metadata"]["name"] for o in store.objects("ml", "demo") or [])


def test_a_created_job_shows_before_its_event_and_its_event_replaces_it():
    store = WatchStore(ListingApi([job("demo-profile-a1", 10)], 10), "/jobs")
    store._list()
    store.remember(job("demo-p0-a1", 12))
    assert names(store) == ["demo-p0-a1", "demo-profile-a1"]
    newer = {**job("demo-p0-a1", 13), "status": {"active": 1}}
    store._notify(newer, deleted=False)
    assert {o["metadata"]["name"]: o for o in store.objects("ml", "demo")}[
        "demo-p0-a1"]["status"] == {"active": 1}
    store.remember(job("demo-p0-a1", 12))  # an older answer never hides a newer event
    assert {o["metadata"]["resourceVersion"] for o in store.objects("ml", "demo")} == {
        "10", "13"}


def test_a_job_the_stream_saw_go_is_not_brought_back():
    store = WatchStore(ListingApi([], 10), "/jobs")
    store._list()
    store._notify(job("demo-p0-a1", 12), deleted=False)
    store._notify(job("demo-p0-a1", 14), deleted=True)  # created and deleted (a TTL, a person)
    store.remember(job("demo-p0-a1", 12))  # our create's answer, arriving late
    assert names(store) == []


def test_a_relist_older_than_our_write_keeps_it():
    store = WatchStore(ListingApi([], 10), "/jobs")
    store._list()
    store.remember(job("demo-p0-a1", 12))
    store._list()  # a relist (410 Gone) served at version 10: the Job is not in it yet
    assert names(store) == ["demo-p0-a1"]
    store.api = ListingApi([job("demo-p1-a1", 15)], 15)
    store._list()  # a list past our write: the server's word alone
    assert names(store) == ["demo-p1-a1"]


def test_the_creators_pool_serves_runs_in_turn():
    """A run's one creation waits for one task of each other run, not for their backlog."""
    import threading

    from merit_operator.fairpool import FairPool

    pool, gate, order = FairPool(1), threading.Event(), []
    pool.submit("busy", gate.wait)  # holds the one thread while the queues fill
    done = [pool.submit("a", order.append, f"a{i}") for i in range(5)]
    done.append(pool.submit("b", order.append, "b0"))
    gate.set()
    for future in done:
        future.result(timeout=5)
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]
    failing = pool.submit("c", lambda: 1 / 0)
    assert isinstance(failing.exception(timeout=5), ZeroDivisionError)
    pool.shutdown(cancel_futures=True)
