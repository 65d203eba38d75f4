"""How the operator spends its rounds at scale: requests for a round are coalesced, a round
reads from caches and ends at its decision, and its commit creates the round's Jobs at once
and writes the status only after all of them; the run's next round waits for that commit."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from merit_operator.fairpool import FairPool
from merit_operator.manifests import RunRef
from merit_operator.metrics import Metrics
from merit_operator.reconcile import KubeRound, RoundOutcome
from merit_operator.settings import Settings
from meritrun.api import MeritRunSpec, MeritRunStatus, PartitionStatus
from meritrun.errors import ObjectNotFound, TransientError
from meritrun.pipeline import CreateJob

RUN = RunRef(name="demo", namespace="ml", uid="u-1")


@pytest.fixture
def ctx(tmp_path: Path):
    from merit_operator.context import OperatorContext

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}]}))
    context = OperatorContext(Settings(kubeconfig=str(kubeconfig), metrics_port=0))
    yield context
    context.close()


class CountingRounds:
    """A reconciler whose rounds take a while and say when to look again (30 s)."""

    def __init__(self) -> None:
        self.rounds = 0

    def round(self, namespace: str, name: str) -> RoundOutcome:
        self.rounds += 1
        time.sleep(0.2)
        return RoundOutcome(delay_seconds=30.0)


def test_wakeups_during_a_round_cost_one_more_round(ctx):
    ctx.reconciler = rounds = CountingRounds()
    ctx.waker("ml", "demo")  # the daemon exists: wake-ups count

    async def scenario() -> list[RoundOutcome]:
        first = asyncio.ensure_future(ctx.reconcile("daemon", "ml", "demo",
                                                    ctx.request("ml", "demo")))
        await asyncio.sleep(0.05)
        for _ in range(20):  # a burst of Job events while the round runs
            ctx.wake("ml", "demo")
        await first
        ticket = ctx.requested("ml", "demo")
        second = await ctx.reconcile("daemon", "ml", "demo", ticket)
        again = await ctx.reconcile("daemon", "ml", "demo", ticket)  # already covered
        return [second, again]

    second, again = asyncio.run(scenario())
    assert rounds.rounds == 2
    assert again.delay_seconds is not None and 29.0 < again.delay_seconds <= 30.0
    assert ctx.metrics.registry.get_sample_value(
        "meritrun_reconcile_coalesced_total", {"handler": "daemon"}) == 1


def test_requests_waiting_for_the_lock_share_the_round_that_starts_next(ctx):
    """A spec edit's handler and the daemon ask at once: one round serves both."""
    ctx.reconciler = rounds = CountingRounds()

    async def scenario() -> tuple[RoundOutcome, RoundOutcome, RoundOutcome]:
        busy = asyncio.ensure_future(ctx.reconcile("daemon", "ml", "demo"))  # no ticket
        await asyncio.sleep(0.05)
        fast, daemon = ctx.request("ml", "demo"), ctx.request("ml", "demo")
        a, b = await asyncio.gather(ctx.reconcile("update", "ml", "demo", fast),
                                    ctx.reconcile("daemon", "ml", "demo", daemon))
        return await busy, a, b

    _, a, b = asyncio.run(scenario())
    assert rounds.rounds == 2  # the round already running, then one for both requests
    assert a.delay_seconds == 30.0 and b.delay_seconds is not None
    assert ctx.metrics.registry.get_sample_value(
        "meritrun_reconcile_coalesced_total", {"handler": "daemon"}) == 1


def _spec() -> MeritRunSpec:
    return MeritRunSpec.model_validate({
        "baseModel": {"uri": "s3://b/base"}, "data": {"uri": "s3://b/d.jsonl"},
        "storage": {"endpoint": "http://s3:9000", "bucket": "bkt"}})


class SlowCreates:
    """A backend whose Job creation takes 0.2 s and fails for Jobs named `*-bad-*`."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self._lock = threading.Lock()
        self.params: list[list[str]] = []  # the Jobs of each params ConfigMap write

    def create_params(self, actions: list[CreateJob], *, run: RunRef,
                      spec: MeritRunSpec) -> None:
        assert self.in_flight == 0  # before any of their Jobs
        self.params.append([a.name for a in actions])

    def unstarted(self, run: RunRef, jobs: dict) -> set[str]:
        return set()  # no pod store

    def create_job(self, action: CreateJob, *, run: RunRef, spec: MeritRunSpec) -> bool:
        with self._lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.2)
        with self._lock:
            self.in_flight -= 1
        if "-bad-" in action.name:
            raise TransientError("HTTP 500: etcd leader changed")
        return True


class NoProgress:
    def get_bytes(self, key: str) -> bytes:
        raise ObjectNotFound(key)


def test_a_rounds_jobs_are_created_at_once_and_the_status_waits_for_them():
    backend, written = SlowCreates(), []
    rec = SimpleNamespace(
        backend=backend, creator=FairPool(16), metrics=Metrics(),
        storages=SimpleNamespace(for_spec=lambda spec: NoProgress()),
        write=lambda run, stored, status: written.append((backend.in_flight, status)))
    kube = KubeRound(rec, RUN, _spec(), stored=None, body={"metadata": {}}, spec_error=None)
    names = [f"demo-p{i}-a1" for i in range(7)] + ["demo-bad-a1"]
    start = time.monotonic()
    for name in names:
        kube.create_job(CreateJob(stage="train", name=name, attempt=1, params=None,
                                  partition=name.split("-")[1]))
    status = MeritRunStatus(phase="Training", partitions=[
        PartitionStatus(name=n.split("-")[1], index=i, sources=["s"], state="Running",
                        attempt=1, job=n) for i, n in enumerate(names)])
    kube.write_status(status)
    assert time.monotonic() - start < 0.15 and not written  # the round ends at its decision
    failures = kube.commit()
    elapsed = time.monotonic() - start
    assert backend.most == 8 and elapsed < 0.2 * 8 / 2
    assert written[0][0] == 0  # the status went out after every creation had ended
    assert backend.params == [names]  # one params write for the round's Jobs
    assert kube.created == set(names[:7])
    assert [f.action.name for f in failures] == ["demo-bad-a1"]
    progress = {p.job: p.progress for p in written[0][1].partitions}
    assert all(progress[n] is not None and progress[n].queued for n in names[:7])
    assert progress["demo-bad-a1"] is None  # not created: nothing claimed about it
    seen = {p.job: p.job_seen for p in written[0][1].partitions}  # in the same write
    assert all(seen[n] for n in names[:7]) and seen["demo-bad-a1"] is None
    assert rec.metrics.registry.get_sample_value(
        "meritrun_jobs_created_total", {"stage": "train"}) == 7


def test_a_rounds_events_are_merged_per_reason():
    from merit_operator.handlers import merged_events
    from meritrun.pipeline import Event

    created = [Event("Normal", "JobCreated", f"partition p{i} attempt 1: job demo-p{i}-a1")
               for i in range(100)]
    merged = merged_events((Event("Normal", "Started", "run started"), *created,
                            Event("Warning", "JobWaiting", "p3: ImagePullBackOff")))
    assert [(e.type, e.reason) for e in merged] == [
        ("Normal", "Started"), ("Normal", "JobCreated"), ("Warning", "JobWaiting")]
    text = merged[1].message
    assert len(text) <= 1000 and text.startswith("partition p0 attempt 1: job demo-p0-a1; ")
    shown = text.count("job demo-")
    assert 10 < shown < 100 and text.endswith(f"; and {100 - shown} more")
    assert merged_events(tuple(created[:2]))[0].message == (
        "partition p0 attempt 1: job demo-p0-a1; partition p1 attempt 1: job demo-p1-a1")


def test_the_job_watch_wakes_a_run_only_when_a_round_would_see_news():
    from merit_operator.jobwatch import JobWatch

    woken: list[str] = []
    watch = JobWatch(None, "/apis/batch/v1/jobs", lambda ns, run: woken.append(run))

    def job(uid: str = "j-1", **status) -> dict:
        return {"metadata": {"name": "demo-p0-a1", "namespace": "ml", "uid": uid,
                             "labels": {"merit.run/run": "demo"}}, "spec": {}, "status": status}

    watch._notify(job(), deleted=False)  # created: news
    watch._notify(job(active=1, startTime="t"), deleted=False)  # the controller's bookkeeping
    watch._notify(job(active=1, ready=1), deleted=False)
    assert woken == ["demo"]
    done = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    watch._notify(job(**done), deleted=False)  # its state changed
    watch._notify(job(**done), deleted=True)  # gone (a TTL, a person)
    watch._notify(job(uid="j-2"), deleted=False)  # a new Job under the old name
    assert woken == ["demo"] * 4 and watch.wakes == 4


class CommittingRounds:
    """Rounds whose commit takes 0.3 s and fails the first time; each round notes whether
    the previous commit had ended when it started."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.commits: list[bool] = []  # per commit: ended
        self.saw_committed: list[bool] = []

    def commit(self, first: bool) -> list:
        time.sleep(0.3)
        self.commits[-1] = True
        if first:
            raise TransientError("HTTP 500: etcd leader changed")
        return []

    def round(self, namespace: str, name: str) -> RoundOutcome:
        self.saw_committed.append(all(self.commits))
        self.commits.append(False)
        return RoundOutcome(delay_seconds=30.0,
                            commit=self.pool.submit(self.commit, len(self.commits) == 1))


def test_a_round_waits_for_the_previous_commit_and_a_failed_commit_wakes_the_run(ctx):
    ctx.reconciler = rounds = CommittingRounds()
    ctx.waker("ml", "demo")

    async def scenario() -> float:
        start = time.monotonic()
        await ctx.reconcile("daemon", "ml", "demo", ctx.request("ml", "demo"))
        returned = time.monotonic() - start  # before its commit
        await ctx.reconcile("daemon", "ml", "demo", ctx.request("ml", "demo"))
        await asyncio.wait_for(ctx.waker("ml", "demo").wait(), 5.0)  # the retry's wake-up
        return returned

    ctx.settings = replace(ctx.settings, error_backoff_seconds=0.2)
    returned = asyncio.run(scenario())
    assert returned < 0.25
    assert rounds.saw_committed == [True, True]  # the second round began after the commit
    assert ctx.metrics.registry.get_sample_value(
        "meritrun_reconcile_errors_total", {"handler": "daemon", "kind": "transient"}) == 1


def _job(name: str, run: str = "demo", uid: str = "j-1", **status) -> dict:
    return {"metadata": {"name": name, "namespace": "ml", "uid": uid,
                         "labels": {"merit.run/run": run}}, "spec": {}, "status": status}


def test_the_job_watch_keeps_a_store_rounds_read_instead_of_listing():
    from merit_operator.jobwatch import JobCache, JobWatch

    class Listing:
        def request(self, method: str, path: str, query: dict) -> dict:
            return {"metadata": {"resourceVersion": "7"},
                    "items": [_job("demo-p0-a1"), _job("other-p0-a1", run="other")]}

    watch = JobWatch(Listing(), "/apis/batch/v1/namespaces/ml/jobs", lambda ns, run: None)
    cache = JobCache([watch], ("ml",))
    assert cache.jobs("ml", "demo") is None  # not listed yet: the round lists itself
    assert watch._list() == "7"
    assert [j["metadata"]["name"] for j in cache.jobs("ml", "demo")] == ["demo-p0-a1"]
    watch._notify(_job("demo-p1-a1", uid="j-2"), deleted=False)
    watch._notify(_job("demo-p0-a1"), deleted=True)
    assert [j["metadata"]["name"] for j in cache.jobs("ml", "demo")] == ["demo-p1-a1"]
    assert cache.jobs("ml", "nobody") == [] and cache.jobs("elsewhere", "demo") is None


def test_a_round_reads_the_newer_of_kopfs_body_and_its_own_last_write():
    from merit_operator.reconcile import newest

    def body(version: str, uid: str = "u-1", phase: str = "Training") -> dict:
        return {"metadata": {"uid": uid, "resourceVersion": version},
                "status": {"phase": phase}}

    written = body("12", phase="Merging")
    assert newest(body("11"), written)["status"]["phase"] == "Merging"  # kopf lags
    assert newest(body("13"), written)["status"]["phase"] == "Training"  # kopf is newer
    assert newest(body("11", uid="u-2"), written)["metadata"]["uid"] == "u-2"  # recreated
    assert newest(body("x"), written) is None and newest(None, written) is None  # a GET
    seen = body("13")
    copied = newest(seen, None)
    copied["status"]["phase"] = "Failed"
    assert seen["status"]["phase"] == "Training"  # a copy: the round never edits kopf's


class NoApi:
    """An API client that must not be called: the round reads from the stores."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the round called the API ({name})")


def test_a_round_reads_its_jobs_and_pods_from_the_stores_not_the_api():
    from merit_operator.backend import KubeBackend
    from merit_operator.manifests import Images

    job = _job("demo-p0-a1", active=1)
    job["metadata"]["labels"]["merit.run/run-uid"] = RUN.uid
    pod = {"metadata": {"name": "demo-p0-a1-x", "namespace": "ml",
                        "labels": {"merit.run/run": "demo", "job-name": "demo-p0-a1"}},
           "status": {"containerStatuses": [{"state": {"waiting": {
               "reason": "ImagePullBackOff", "message": "no such image"}}}]}}
    stores = SimpleNamespace(jobs=lambda ns, run: [job] if (ns, run) == ("ml", "demo") else [],
                             run_pods=lambda ns, run: [pod])
    backend = KubeBackend(NoApi(), images=Images(trainer="t", merger="m"), jobs=stores)
    seen = backend.observe_jobs(RUN, None)
    assert seen["demo-p0-a1"].state == "Active"
    assert seen["demo-p0-a1"].waiting == "ImagePullBackOff: no such image"


def test_a_rounds_partition_results_are_read_at_once():
    from meritrun.artifacts import RunId
    from meritrun.observe import observe_storage

    class SlowStore:
        def get_bytes(self, key: str) -> bytes:
            time.sleep(0.2)
            raise ObjectNotFound(key)

    status = MeritRunStatus(phase="Training", partitions=[
        PartitionStatus(name=f"p{i}", index=i, sources=["s"], state="Running", attempt=1,
                        job=f"demo-p{i}-a1") for i in range(8)])
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        found = observe_storage(SlowStore(), RunId("demo", "u-1"), status, fetch=pool.map)
    assert found["partition_results"] == {} and time.monotonic() - start < 0.2 * 8 / 2


def test_a_commit_holds_no_thread_while_its_creations_run():
    """Commits waiting for slow creations must not keep a commit that is only a status
    write from its pool's threads: it goes to the pool once its own creations ended."""
    backend, written = SlowCreates(), []
    rec = SimpleNamespace(
        backend=backend, creator=FairPool(16), metrics=Metrics(),
        storages=SimpleNamespace(for_spec=lambda spec: NoProgress()),
        write=lambda run, stored, status: written.append(run.name))
    committer = ThreadPoolExecutor(1)
    slow = KubeRound(rec, RUN, _spec(), stored=None, body={"metadata": {}}, spec_error=None)
    for i in range(3):
        slow.create_job(CreateJob(stage="train", name=f"demo-p{i}-a1", attempt=1, params=None,
                                  partition=f"p{i}"))
    slow.write_status(MeritRunStatus(phase="Training"))
    slow.start_creates()
    slow_done = slow.commit_when_created(committer)
    other = KubeRound(rec, replace(RUN, name="other"), _spec(), stored=None,
                      body={"metadata": {}}, spec_error=None)
    other.write_status(MeritRunStatus(phase="Training"))
    other.start_creates()
    assert other.commit_when_created(committer).result(timeout=0.15) == []
    assert written == ["other"] and not slow_done.done()  # its creations take 0.2 s
    assert slow_done.result(timeout=5) == [] and written == ["other", "demo"]
    assert slow.created == {"demo-p0-a1", "demo-p1-a1", "demo-p2-a1"}


def test_only_a_new_spec_generation_asks_for_a_round(ctx):
    """kopf's change detection is off; our status writes make no new generation, an edit
    does (a new run's first event asks nothing: its daemon starts with a round)."""
    from merit_operator.handlers import NoDiffBase

    assert [ctx.new_generation("ml", "demo", g) for g in (1, 1, 1, 2, 2)] == [
        False, False, False, True, False]
    storage = NoDiffBase()
    body = {"spec": {"suspend": True}, "status": {"phase": "Suspended"}}
    assert storage.fetch(body=body) == storage.build(body=body) == {}  # never a change
