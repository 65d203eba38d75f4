"""Leader election rules: the step table, and two candidates sharing one Lease.

The shared Lease lives in a small in-memory store that applies the one API-server rule the
election relies on (a write carrying a stale resourceVersion gets 409); the real control
plane test runs two operator processes against kube-apiserver.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from merit_operator.kubeapi import ApiError
from merit_operator.leader import LeaseElector, LeaseTiming, lease_spec, lease_step

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def lease(holder: str | None, duration: int = 15) -> dict:
    spec = {"leaseDurationSeconds": duration}
    if holder:
        spec["holderIdentity"] = holder
    return {"metadata": {"resourceVersion": "7"}, "spec": spec}


@pytest.mark.parametrize(("current", "unchanged_for", "step"), [
    (None, 0, "create"),
    (lease("me"), 0, "renew"),
    (lease("other"), 3, "wait"),
    (lease("other"), 16, "take"),  # not renewed for longer than its duration
    (lease(None), 0, "take"),  # released by a leader that stopped cleanly
])
def test_lease_step(current, unchanged_for, step):
    assert lease_step(current, me="me", unchanged_for=unchanged_for, duration=15) == step


def test_taking_over_counts_a_transition_renewing_does_not():
    old = {"spec": {"holderIdentity": "a", "acquireTime": "t0", "leaseTransitions": 2}}
    took = lease_spec(old, me="b", step="take", now=NOW, duration=15)
    assert took["leaseTransitions"] == 3 and took["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    renewed = lease_spec({"spec": took}, me="b", step="renew", now=NOW, duration=15)
    assert renewed["leaseTransitions"] == 3 and renewed["holderIdentity"] == "b"


class LeaseStore:
    """One Lease with resourceVersion checks, as the API server keeps it."""

    def __init__(self) -> None:
        self.obj: dict | None = None
        self.version = 0
        self.lock = threading.Lock()

    def get(self, path: str) -> dict:
        with self.lock:
            if self.obj is None:
                raise ApiError(404, "NotFound", path)
            return {"metadata": dict(self.obj["metadata"]), "spec": dict(self.obj["spec"])}

    def create(self, path: str, body: dict) -> dict:
        with self.lock:
            if self.obj is not None:
                raise ApiError(409, "AlreadyExists", path)
            self.version += 1
            self.obj = {"metadata": {"resourceVersion": str(self.version)},
                        "spec": dict(body["spec"])}
            return self.obj

    def merge_patch(self, path: str, body: dict) -> dict:
        with self.lock:
            assert self.obj is not None
            if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            spec = {**self.obj["spec"], **body["spec"]}
            self.obj["spec"] = {k: v for k, v in spec.items() if v is not None}
            self.version += 1
            self.obj["metadata"]["resourceVersion"] = str(self.version)
            return self.obj


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_one_leads_the_other_takes_over_only_when_renewals_stop():
    store, clock = LeaseStore(), Clock()
    timing = LeaseTiming(duration=15, renew_deadline=10, retry_period=2)
    a = LeaseElector(store, namespace="ops", name="op", identity="a", timing=timing,  # type: ignore[arg-type]
                     clock=clock)
    b = LeaseElector(store, namespace="ops", name="op", identity="b", timing=timing,  # type: ignore[arg-type]
                     clock=clock)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    for _ in range(10):  # a keeps renewing: b never sees the Lease stand still
        clock.t += 5
        assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    clock.t += 10  # a stopped renewing: still within the duration
    assert not b.try_acquire_or_renew()
    clock.t += 6
    assert b.try_acquire_or_renew() and store.obj["spec"]["holderIdentity"] == "b"
    assert store.obj["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # the old leader learns it lost


def test_a_released_lease_is_taken_at_once():
    store, clock = LeaseStore(), Clock()
    a = LeaseElector(store, namespace="ops", name="op", identity="a", clock=clock)  # type: ignore[arg-type]
    b = LeaseElector(store, namespace="ops", name="op", identity="b", clock=clock)  # type: ignore[arg-type]
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    a.release()
    assert b.try_acquire_or_renew()


def test_racing_candidates_one_wins():
    store = LeaseStore()
    a = LeaseElector(store, namespace="ops", name="op", identity="a")  # type: ignore[arg-type]
    b = LeaseElector(store, namespace="ops", name="op", identity="b")  # type: ignore[arg-type]
    a.try_acquire_or_renew()
    a.release()
    # both read the released Lease; the slower write carries a stale resourceVersion
    a_read, b_read = store.get(""), store.get("")
    a._read = lambda: a_read  # type: ignore[method-assign]
    b._read = lambda: b_read  # type: ignore[method-assign]
    assert [a.try_acquire_or_renew(), b.try_acquire_or_renew()] == [True, False]


def test_a_leader_that_cannot_renew_gives_up():
    store = LeaseStore()
    timing = LeaseTiming(duration=3, renew_deadline=0.2, retry_period=0.05)
    a = LeaseElector(store, namespace="ops", name="op", identity="a", timing=timing)  # type: ignore[arg-type]
    assert a.try_acquire_or_renew()
    store.obj["spec"]["holderIdentity"] = "usurper"
    lost = threading.Event()
    a.keep_renewing(threading.Event(), lost.set)
    assert lost.is_set()
