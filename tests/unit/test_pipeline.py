"""The pure state machine: every transition, from tables; no torch, no kopf, no I/O."""

from __future__ import annotations

import pytest
from support.decide import POLICY, created, make_spec, result, step

from meritrun.api import MeritRunStatus
from meritrun.jobs import CreateJob
from meritrun.pipeline import DeleteJob, JobObservation, MergeOutcome
from meritrun.stages import Plan, PlannedPartition

PLAN = Plan(strategy="random", partitions=[
    PlannedPartition(name="p0", index=0, sources=["a", "b"], tokens=100),
    PlannedPartition(name="p1", index=1, sources=["c"], tokens=50),
])


def training_status(spec=None) -> MeritRunStatus:
    """A run whose profile just succeeded: both partition jobs created."""
    spec = spec or make_spec()
    d = step(spec, None)
    d = step(spec, d.status, jobs={"r-profile-a1": JobObservation("Succeeded")}, plan=PLAN,
             plan_uri="s3://merit/plan.json")
    return d.status


def test_new_run_starts_profiling():
    d = step(make_spec(), None)
    assert d.status.phase == "Profiling"
    assert created(d) == ["r-profile-a1"]
    assert d.status.start_time == "2026-01-01T00:00:00Z"
    assert d.status.observed_generation == 1


def test_active_profile_job_waits_and_repeat_is_idempotent():
    spec = make_spec()
    first = step(spec, None)
    again = step(spec, first.status, jobs={"r-profile-a1": JobObservation("Active")})
    assert created(again) == [] and again.status.profile.attempt == 1


def test_plan_creates_one_training_job_per_partition():
    spec = make_spec()
    d = step(spec, step(spec, None).status, jobs={"r-profile-a1": JobObservation("Succeeded")},
             plan=PLAN, plan_uri="s3://merit/plan.json")
    assert d.status.phase == "Training"
    assert created(d) == ["r-p0-a1", "r-p1-a1"]
    assert [p.sources for p in d.status.partitions] == [["a", "b"], ["c"]]
    assert d.status.plan.partitions == 2 and d.status.progress == "0/2"
    assert any(c.type == "Profiled" and c.status == "True" for c in d.status.conditions)
    train = next(a for a in d.actions if isinstance(a, CreateJob) and a.partition == "p0")
    assert train.params.output == "runs/r/uid-1/partitions/p0/attempt-1"


def test_failed_partition_backs_off_then_retries_with_new_attempt():
    spec = make_spec(backoffLimit=2)
    st = training_status(spec)
    d = step(spec, st, at=5, jobs={"r-p0-a1": JobObservation("Failed", "OOM"),
                                   "r-p1-a1": JobObservation("Active")})
    p0 = d.status.partitions[0]
    assert p0.state == "BackingOff" and p0.attempt == 1 and "OOM" in p0.message
    assert p0.retry_after == "2026-01-01T00:00:15Z"
    assert any(e.reason == "Retrying" for e in d.events)
    early = step(spec, d.status, at=10, jobs={"r-p1-a1": JobObservation("Active")})
    assert created(early) == []
    later = step(spec, d.status, at=16, jobs={"r-p1-a1": JobObservation("Active")})
    assert created(later) == ["r-p0-a2"] and later.status.partitions[0].attempt == 2


@pytest.mark.parametrize("attempt,expected", [(1, 10), (2, 20), (3, 40), (4, 60), (9, 60)])
def test_backoff_is_exponential_and_capped(attempt, expected):
    assert POLICY.backoff(attempt).total_seconds() == expected


def test_vanished_job_is_recreated_under_the_same_attempt():
    spec = make_spec()
    st = training_status(spec)
    d = step(spec, st, jobs={"r-p1-a1": JobObservation("Active")})  # r-p0-a1 deleted
    assert created(d) == ["r-p0-a1"] and d.status.partitions[0].attempt == 1


def test_job_succeeded_without_artifact_counts_as_failure():
    spec = make_spec(backoffLimit=0)
    st = training_status(spec)
    d = step(spec, st, jobs={"r-p0-a1": JobObservation("Succeeded"),
                             "r-p1-a1": JobObservation("Active")})
    assert d.status.partitions[0].state == "Failed"
    assert "no complete artifact" in d.status.partitions[0].message


def test_all_partitions_done_starts_merge_with_artifacts_recorded():
    spec = make_spec()
    st = training_status(spec)
    d = step(spec, st, partition_results={"p0": result("p0"), "p1": result("p1")})
    assert d.status.phase == "Merging" and created(d) == ["r-merge-a1"]
    assert d.status.progress == "2/2"
    assert d.status.partitions[0].artifact.uri == "s3://merit/p0/a1"
    merge = next(a for a in d.actions if isinstance(a, CreateJob))
    assert [p.prefix for p in merge.params.partitions] == [
        "runs/r/uid-1/partitions/p0/attempt-1", "runs/r/uid-1/partitions/p1/attempt-1"]


def _fail_p1_forever(spec):
    st = training_status(spec)
    for attempt in range(1, spec.backoff_limit + 2):
        d = step(spec, st, at=1000 * attempt, partition_results={"p0": result("p0")},
                 jobs={f"r-p1-a{attempt}": JobObservation("Failed", "boom")})
        st = d.status
        if st.partitions[1].state == "BackingOff":
            st = step(spec, st, at=1000 * attempt + 100).status
    return d


def test_partition_out_of_retries_fails_run_under_full_quorum():
    d = _fail_p1_forever(make_spec(backoffLimit=1))
    assert d.status.partitions[1].state == "Failed" and d.status.partitions[1].attempt == 2
    assert d.status.phase == "Failed"
    cond = next(c for c in d.status.conditions if c.type == "Failed")
    assert cond.reason == "QuorumNotMet" and "p1" in cond.message


def test_partial_quorum_merges_the_rest_and_records_left_out():
    d = _fail_p1_forever(make_spec(backoffLimit=1, merge={"quorum": 0.5}))
    assert d.status.phase == "Merging"
    assert d.status.merge.included == ["p0"] and d.status.merge.left_out == ["p1"]
    merge = next(a for a in d.actions if isinstance(a, CreateJob))
    assert [p.name for p in merge.params.partitions] == ["p0"]


def _merging_status(spec):
    st = training_status(spec)
    return step(spec, st, partition_results={"p0": result("p0"), "p1": result("p1")}).status


def test_merge_success_finishes_run():
    spec = make_spec()
    d = step(spec, _merging_status(spec), jobs={"r-merge-a1": JobObservation("Succeeded")},
             merge_outcome=MergeOutcome(model_uri="s3://merit/runs/r/uid-1/merged/attempt-1/model"))
    assert d.status.phase == "Succeeded"
    assert d.status.model_uri.endswith("merged/attempt-1/model")
    ready = next(c for c in d.status.conditions if c.type == "Ready")
    assert ready.status == "True" and d.status.completion_time is not None


def test_refusals_that_break_quorum_fail_without_retry():
    spec = make_spec(backoffLimit=3)
    outcome = MergeOutcome(model_uri=None, refused={"p1": "sha256: mismatch in model.safetensors"})
    d = step(spec, _merging_status(spec), jobs={"r-merge-a1": JobObservation("Failed", "exit 3")},
             merge_outcome=outcome)
    assert d.status.phase == "Failed" and created(d) == []
    assert "sha256" in d.status.partitions[1].message
    assert "p1" in d.status.merge.left_out


def test_merge_refusal_within_quorum_is_recorded_on_success():
    spec = make_spec(merge={"quorum": 0.5})
    outcome = MergeOutcome(model_uri="s3://x/model", refused={"p1": "non-finite: NaN"})
    d = step(spec, _merging_status(spec), jobs={"r-merge-a1": JobObservation("Succeeded")},
             merge_outcome=outcome)
    assert d.status.phase == "Succeeded" and d.status.merge.left_out == ["p1"]


def test_terminal_run_creates_nothing_and_stops_what_still_runs():
    spec = make_spec()
    done = MeritRunStatus(phase="Succeeded")
    d = step(spec, done, jobs={"r-p0-a1": JobObservation("Active"),
                               "r-p1-a1": JobObservation("Succeeded")})
    assert d.actions == (DeleteJob("r-p0-a1"),) and d.status.phase == "Succeeded"
    assert d.events == ()


def test_suspend_creates_nothing_and_resume_continues():
    spec = make_spec(suspend=True)
    d = step(spec, None)
    assert d.status.phase == "Suspended" and d.actions == ()
    resumed = step(make_spec(), d.status, at=5)
    assert resumed.status.phase == "Profiling" and created(resumed) == ["r-profile-a1"]
    cond = next(c for c in resumed.status.conditions if c.type == "Suspended")
    assert cond.status == "False"


def test_deadline_fails_run_and_deletes_active_jobs():
    spec = make_spec(activeDeadlineSeconds=60)
    st = training_status(spec)
    d = step(spec, st, at=61, jobs={"r-p0-a1": JobObservation("Active"),
                                    "r-p1-a1": JobObservation("Succeeded")})
    assert d.status.phase == "Failed"
    assert [a.name for a in d.actions if isinstance(a, DeleteJob)] == ["r-p0-a1"]
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "DeadlineExceeded"


def test_profile_out_of_retries_fails_run():
    spec = make_spec(backoffLimit=0)
    d = step(spec, step(spec, None).status, jobs={"r-profile-a1": JobObservation("Failed", "x")})
    assert d.status.phase == "Failed"
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "ProfileFailed"


def test_pull_site_partition_awaits_contribution_until_deadline():
    spec = make_spec(sites=[{"name": "site-b", "mode": "pull", "deadlineSeconds": 100}])
    plan = Plan(strategy="bySite", partitions=[
        PlannedPartition(name="p0", index=0, sources=["a"], tokens=10),
        PlannedPartition(name="p1", index=1, sources=["c"], tokens=10, site="site-b")])
    d = step(spec, step(spec, None).status, jobs={"r-profile-a1": JobObservation("Succeeded")},
             plan=plan)
    assert created(d) == ["r-p0-a1"]
    assert d.status.partitions[1].state == "AwaitingContribution"
    late = step(spec, d.status, at=101, partition_results={"p0": result("p0")})
    assert late.status.partitions[1].state == "Failed"
    assert "deadline" in late.status.partitions[1].message
    assert late.status.phase == "Failed"  # quorum 1.0


def test_kubeconfig_site_jobs_target_that_cluster():
    spec = make_spec(sites=[{"name": "east", "mode": "kubeconfig",
                             "secretRef": {"name": "east-kubeconfig"}}])
    plan = Plan(strategy="bySite", partitions=[
        PlannedPartition(name="p0", index=0, sources=["a"], tokens=10, site="east")])
    d = step(spec, step(spec, None).status, jobs={"r-profile-a1": JobObservation("Succeeded")},
             plan=plan)
    job = next(a for a in d.actions if isinstance(a, CreateJob))
    assert job.cluster == "east"


def test_mixture_search_runs_after_merge():
    spec = make_spec(mixtureSearch={"enabled": True},
                     data={"uri": "s3://d/mix.jsonl", "heldOutUri": "s3://d/held.jsonl"})
    d = step(spec, _merging_status(spec), jobs={"r-merge-a1": JobObservation("Succeeded")},
             merge_outcome=MergeOutcome(model_uri="s3://x/model"))
    assert d.status.phase == "Searching" and created(d) == ["r-search-a1"]
    d = step(spec, d.status, search_best={"p0": 0.75, "p1": 0.25})
    assert d.status.phase == "Succeeded" and d.status.search.best == {"p0": 0.75, "p1": 0.25}
