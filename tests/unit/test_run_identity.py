"""A run's results belong to that run: its uid in every key, document and check on read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.decide import RUN, T0, make_spec, step

from merit_operator.reconcile import results_uids
from meritrun import artifacts
from meritrun.api import MeritRunStatus, PartitionStatus
from meritrun.artifacts import PartitionManifest, RunId, TokenCounts
from meritrun.assignment import build_train_assignment
from meritrun.observe import observe_storage, read_partition_result, read_plan
from meritrun.stages import Plan, PlannedPartition
from meritrun.storage import open_storage

OLD, NEW = RunId("demo", "uid-old"), RunId("demo", "uid-new")


@pytest.fixture
def store(tmp_path: Path):
    return open_storage((tmp_path / "store").as_uri())


def test_every_prefix_carries_the_uid():
    assert artifacts.run_prefix(NEW) == "runs/demo/uid-new"
    keys = [artifacts.plan_prefix(NEW, 1), artifacts.partition_prefix(NEW, "p0", 2),
            artifacts.merged_prefix(NEW, 1), artifacts.search_prefix(NEW, 1),
            artifacts.verdict_prefix(NEW, "p0", 1)]
    assert all(k.startswith("runs/demo/uid-new/") for k in keys)
    assert artifacts.plan_prefix(OLD, 1) != artifacts.plan_prefix(NEW, 1)


@pytest.mark.parametrize("uid", ["", "a/b", "..", "-x", "a b"])
def test_a_uid_is_one_safe_key_segment(uid):
    with pytest.raises(ValueError, match="run uid"):
        RunId("demo", uid)


def manifest(run: RunId | None) -> bytes:
    return PartitionManifest(
        run="demo", run_uid=run.uid if run else None, partition="p0", attempt=1, sources=["a"],
        tokens=TokenCounts(supervised=7, total=9), base="sha256:x", files={},
    ).model_dump_json().encode()


def test_observe_takes_only_this_runs_manifest(store):
    key = f"{artifacts.partition_prefix(NEW, 'p0', 1)}/{artifacts.MANIFEST_NAME}"
    store.put_bytes(key, manifest(OLD))  # another run's manifest under this run's key
    assert read_partition_result(store, NEW, "p0", 1) is None
    store.put_bytes(key, manifest(None))  # a manifest that names no run
    assert read_partition_result(store, NEW, "p0", 1) is None
    store.put_bytes(key, manifest(NEW))
    assert read_partition_result(store, NEW, "p0", 1).tokens == 7


def test_observe_takes_only_this_runs_plan_report_and_verdict(store):
    plan = {"strategy": "random", "partitions": [{"name": "p0", "index": 0, "sources": ["a"],
                                                  "tokens": 5}]}
    key = f"{artifacts.plan_prefix(NEW, 1)}/plan.json"
    store.put_bytes(key, json.dumps(plan | {"run_uid": OLD.uid}).encode())
    assert read_plan(store, NEW, 1)[0] is None
    store.put_bytes(key, json.dumps(plan | {"run_uid": NEW.uid}).encode())
    assert read_plan(store, NEW, 1)[0].partitions[0].name == "p0"

    status = MeritRunStatus(
        partitions=[PartitionStatus(name="p0", index=0, sources=["a"], state="Verifying",
                                    attempt=1)])
    status.merge.state, status.merge.attempt = "Running", 1
    report = {"status": "succeeded", "refused": []}
    store.put_bytes(f"{artifacts.merged_prefix(NEW, 1)}/merge_report.json",
                    json.dumps(report | {"run_uid": OLD.uid}).encode())
    verdict = {"partition": "p0", "attempt": 1, "accepted": True}
    store.put_bytes(f"{artifacts.verdict_prefix(NEW, 'p0', 1)}/verdict.json",
                    json.dumps(verdict | {"run_uid": OLD.uid}).encode())
    seen = observe_storage(store, NEW, status)
    assert seen["merge_outcome"] is None and seen["verdicts"] == {}
    store.put_bytes(f"{artifacts.merged_prefix(NEW, 1)}/merge_report.json",
                    json.dumps(report | {"run_uid": NEW.uid}).encode())
    store.put_bytes(f"{artifacts.verdict_prefix(NEW, 'p0', 1)}/verdict.json",
                    json.dumps(verdict | {"run_uid": NEW.uid}).encode())
    seen = observe_storage(store, NEW, status)
    assert seen["merge_outcome"].model_uri.endswith("runs/demo/uid-new/merged/attempt-1/model")
    assert seen["verdicts"]["p0"].accepted


def test_a_sites_sketches_count_only_when_they_name_this_run(store):
    from meritrun.assignment import sketch_output_prefix
    from meritrun.observe import read_sketches_uri

    key = f"{sketch_output_prefix(NEW, 'lab', 1)}/sketch.json"
    store.put_bytes(key, json.dumps({"names": ["a"], "run_uid": OLD.uid}).encode())
    assert read_sketches_uri(store, NEW, "lab", 1) is None
    store.put_bytes(key, json.dumps({"names": ["a"], "run_uid": NEW.uid}).encode())
    assert read_sketches_uri(store, NEW, "lab", 1).endswith("runs/demo/uid-new/sketches/lab/"
                                                            "attempt-1")


def test_decide_records_the_uid_and_every_job_carries_it():
    d = step(make_spec(), None)
    assert d.status.run_uid == RUN.uid
    [job] = d.actions
    assert (job.params.run, job.params.run_uid) == ("r", RUN.uid)
    assert job.params.output == f"runs/r/{RUN.uid}/plan/attempt-1"
    assert job.name == "r-profile-a1"  # Job names stay by the run's name


def test_a_fixed_invalid_spec_starts_over_under_its_own_uid():
    """An InvalidSpec run whose spec is fixed starts over with attempt counters at 1: under
    <uid>-g<generation>, so its attempt 1 never meets the keys of the run before the reset."""
    from meritrun.pipeline import Observed, decide

    spec = make_spec()
    invalid = decide(None, None, Observed(run=RUN, now=T0, generation=1, spec_error="bad"))
    assert invalid.status.phase == "Failed" and invalid.status.run_uid == RUN.uid
    old_plan = Plan(strategy="random", partitions=[
        PlannedPartition(name="p0", index=0, sources=["a"], tokens=5)])
    fixed = decide(spec, invalid.status, Observed(run=RUN, now=T0, generation=2,
                                                  plan=old_plan))  # read before the reset
    assert fixed.status.plan is None and fixed.status.profile.attempt == 1
    assert fixed.status.run_uid == f"{RUN.uid}-g2"
    [job] = fixed.actions
    assert job.params.run_uid == f"{RUN.uid}-g2"
    assert job.params.output == f"runs/r/{RUN.uid}-g2/plan/attempt-1"
    # Later rounds keep it (the status says which), whatever uid the backend observed with.
    later = decide(spec, fixed.status, Observed(run=RUN, now=T0, generation=2))
    assert later.status.run_uid == f"{RUN.uid}-g2"


def test_deleting_artifacts_takes_this_objects_uids_only(store):
    for uid in ("u-1", "u-1-g4", "u-2", "u-10"):
        store.put_bytes(f"runs/demo/{uid}/plan/attempt-1/plan.json", b"{}")
    store.put_bytes("runs/demo-2/u-1/plan/attempt-1/plan.json", b"{}")
    assert results_uids(store, "demo", "u-1") == ["u-1", "u-1-g4"]


def test_a_grant_and_its_assignment_carry_the_uid():
    spec = make_spec(sites=[{"name": "lab", "mode": "pull"}],
                     data={"uri": "s3://d/mix.jsonl",
                           "sources": [{"name": "a", "site": "lab"}, {"name": "b"}]})
    part = PartitionStatus(name="p0", index=0, sources=["a"], site="lab", attempt=1)
    old, new = (build_train_assignment(r, spec, part) for r in (OLD, NEW))
    assert new.run_uid == "uid-new" and new.output.startswith("runs/demo/uid-new/")
    assert new.key.startswith("runs/demo/uid-new/sites/lab/")
    assert new.train_params(data_uri="x", base_model="y", storage=new.storage,
                            output=new.output).run_uid == "uid-new"
    assert old.key != new.key
