"""One rule, one place: quorum over the plan, Jobs deleted where they run, grants revoked
until gone, invalid specs and spec edits as observations, vanished Jobs, constant reasons."""

from __future__ import annotations

from datetime import timedelta

import pytest
from support.decide import RUN, created, make_spec, result, step

from meritrun.api import MeritRunStatus
from meritrun.pipeline import (
    DeleteJob,
    GrantRef,
    JobObservation,
    MergeOutcome,
    RevokeGrant,
    exit_verdict,
)
from meritrun.stages import Plan, PlannedPartition

EAST = {"name": "east", "mode": "kubeconfig", "secretRef": {"name": "east-kc"}}
PULL = {"name": "west", "mode": "pull", "deadlineSeconds": 1000}
GRANT = GrantRef("r", "west", "p1", 1)


def plan(k: int, site: str | None = None, last_site: str | None = None) -> Plan:
    return Plan(strategy="bySite", partitions=[
        PlannedPartition(name=f"p{i}", index=i, sources=[f"s{i}"], tokens=10,
                         site=last_site if i == k - 1 and last_site else site)
        for i in range(k)])


def training(spec, k=2, **kw):
    d = step(spec, None)
    return step(spec, d.status, jobs={"r-profile-a1": JobObservation("Succeeded")},
                plan=plan(k, **kw))


def deletes(d):
    return [(a.name, a.cluster) for a in d.actions if isinstance(a, DeleteJob)]


def revoked(d):
    return [a.ref for a in d.actions if isinstance(a, RevokeGrant)]


def test_delete_goes_to_the_jobs_cluster_also_when_not_observed_this_round():
    spec = make_spec(sites=[EAST], activeDeadlineSeconds=60)
    d = step(spec, training(spec, site="east").status, at=61)
    assert d.status.phase == "Failed"
    assert deletes(d) == [("r-p0-a1", "east"), ("r-p1-a1", "east")]


def test_each_job_carries_what_is_left_of_the_run_deadline():
    spec = make_spec(activeDeadlineSeconds=600)
    d = step(spec, step(spec, None).status, at=100,
             jobs={"r-profile-a1": JobObservation("Succeeded")}, plan=plan(1))
    assert [a.deadline_seconds for a in d.actions if a.__class__.__name__ == "CreateJob"] == [500]


@pytest.mark.parametrize(("seen", "expected"), [(False, "Running"), (True, "BackingOff")])
def test_a_job_vanishing_after_it_was_seen_is_a_failed_attempt(seen, expected):
    spec = make_spec()
    st = training(spec, k=1).status
    if seen:
        st = step(spec, st, jobs={"r-p0-a1": JobObservation("Active")}).status
    d = step(spec, st)  # the TTL controller (or a user) removed it
    assert d.status.partitions[0].state == expected
    assert created(d) == ([] if seen else ["r-p0-a1"])


def test_a_permanent_failure_is_not_retried():
    spec = make_spec(backoffLimit=3)
    d = step(spec, training(spec, k=1).status,
             jobs={"r-p0-a1": JobObservation("Failed", "no such file", permanent=True)})
    assert d.status.partitions[0].state == "Failed" and d.status.phase == "Failed"


def test_a_stage_blaming_the_spec_fails_the_run_invalid_spec_at_once():
    """GPUs the image cannot use: no retry, no waiting for the other partitions."""
    spec = make_spec(backoffLimit=3)
    why = 'spec.template.resources.limits["nvidia.com/gpu"]: 1 GPU(s) requested, but ...'
    d = step(spec, training(spec, k=2).status, jobs={
        "r-p0-a1": JobObservation("Failed", why, permanent=True, invalid_spec=True),
        "r-p1-a1": JobObservation("Active")})
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert (d.status.phase, failed.reason) == ("Failed", "InvalidSpec")
    assert 'limits["nvidia.com/gpu"]' in failed.message and "partition p0" in failed.message
    assert d.status.partitions[0].state == "Failed" and created(d) == []
    assert ("r-p1-a1", None) in deletes(d)


@pytest.mark.parametrize(("code", "verdict"), [
    (5, {"permanent": True, "invalid_spec": True}),
    (4, {"permanent": True, "invalid_spec": False}),
    (2, {"permanent": False, "invalid_spec": False}), (None, {"permanent": False,
                                                             "invalid_spec": False})])
def test_exit_codes_read_as_retry_verdicts(code, verdict):
    assert exit_verdict(code) == verdict


@pytest.mark.parametrize(("observation", "reason"), [
    (JobObservation("Succeeded"), "PartitionSucceeded"),
    (JobObservation("Failed", "x", permanent=True), "PartitionFailed"),
])
def test_event_reasons_are_constant_words(observation, reason):
    spec = make_spec(backoffLimit=0, merge={"quorum": 0.5})
    results = {"p0": result("p0")} if observation.state == "Succeeded" else {}
    d = step(spec, training(spec).status, jobs={"r-p0-a1": observation},
             partition_results=results)
    event = next(e for e in d.events if e.reason == reason)
    assert "p0" in event.message and " " not in event.reason


def _merging(spec, k=4, failed=2):
    d = training(spec, k=k)
    jobs = {f"r-p{i}-a1": JobObservation("Failed", "x", permanent=True) for i in range(failed)}
    res = {f"p{i}": result(f"p{i}") for i in range(failed, k)}
    return step(spec, d.status, jobs=jobs, partition_results=res)


def test_the_merge_gets_the_plans_numbers():
    spec = make_spec(merge={"quorum": 0.5})
    d = _merging(spec)
    [merge] = [a for a in d.actions if a.__class__.__name__ == "CreateJob"]
    assert merge.params.planned == 4 and merge.params.required == 2
    assert [p.name for p in merge.params.partitions] == ["p2", "p3"]


@pytest.mark.parametrize("model_uri", [None, "s3://m/model"])
def test_merge_refusals_count_against_the_plans_quorum(model_uri):
    spec = make_spec(merge={"quorum": 0.5})
    d = step(spec, _merging(spec).status, jobs={"r-merge-a1": JobObservation(
        "Succeeded" if model_uri else "Failed")},
             merge_outcome=MergeOutcome(model_uri, refused={"p3": "sha256: differs"}))
    assert d.status.phase == "Failed" and d.status.model_uri is None
    cond = next(c for c in d.status.conditions if c.type == "Failed")
    assert cond.reason == "QuorumNotMet" and "1/4" in cond.message


def _awaiting(spec):
    return training(spec, last_site="west")


def test_live_grants_are_revoked_every_round_until_gone_also_when_terminal():
    spec = make_spec(sites=[PULL], activeDeadlineSeconds=50)
    d = step(spec, _awaiting(spec).status, at=60, grants={GRANT.grant: GRANT})
    assert d.status.phase == "Failed" and revoked(d) == [GRANT]
    again = step(spec, d.status, at=70, grants={GRANT.grant: GRANT})  # the revoke failed
    assert revoked(again) == [GRANT] and created(again) == []
    assert revoked(step(spec, d.status, at=80)) == []  # the store no longer holds it


def test_a_grant_whose_offer_was_never_recorded_is_revoked():
    spec = make_spec(sites=[PULL], activeDeadlineSeconds=50)
    d = step(spec, training(spec, k=1).status, at=60, grants={GRANT.grant: GRANT})
    assert revoked(d) == [GRANT]


def test_a_grant_of_an_older_attempt_is_revoked_while_the_new_one_is_wanted():
    spec = make_spec(sites=[PULL])
    d = _awaiting(spec)
    old = GrantRef("r", "west", "p1", 0)
    again = step(spec, d.status, grants={GRANT.grant: old})
    assert revoked(again) == [old]
    assert revoked(step(spec, d.status, grants={GRANT.grant: GRANT})) == []


def test_an_invalid_spec_fails_stops_and_revokes_through_the_same_path():
    spec = make_spec(sites=[PULL])
    st = _awaiting(spec).status
    d = step(None, st, spec_error="spec.training.learningRate: must be > 0",
             grants={GRANT.grant: GRANT})
    assert d.status.phase == "Failed" and d.status.message.startswith("spec.training")
    assert deletes(d) == [("r-p0-a1", None)] and revoked(d) == [GRANT]
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "InvalidSpec"
    fixed = step(spec, d.status, generation=2)  # it had started: its Job names would be reused
    assert fixed.status.phase == "Failed" and created(fixed) == []
    assert "delete and re-create" in fixed.status.message


def test_a_spec_invalid_from_the_start_runs_once_fixed():
    d = step(None, None, spec_error="spec.training.learningRate: must be > 0")
    assert d.status.phase == "Failed" and "re-create" not in d.status.message
    fixed = step(make_spec(), d.status, generation=2)
    assert fixed.status.phase == "Profiling" and created(fixed) == ["r-profile-a1"]


@pytest.mark.parametrize(("sites", "reason"), [
    ([{**PULL, "mode": "kubeconfig", "secretRef": {"name": "kc"}}], "SpecChanged"),
    ([], "SpecChanged"),
])
def test_editing_sites_mid_run_fails_with_a_reason_and_never_raises(sites, reason):
    st = _awaiting(make_spec(sites=[PULL])).status
    edited = make_spec(sites=sites or None)
    d = step(edited, st)
    assert d.status.phase == "Failed" and created(d) == []
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == reason
    assert revoked(d) == [GRANT]  # the waiting partition's grant, from the status alone


def test_removing_one_of_two_sketch_sites_fails_the_run_instead_of_raising():
    two = [{**PULL, "sketches": True}, {**PULL, "name": "north", "sketches": True}]
    sources = [{"name": "a", "uri": "s3://d/a"}, {"name": "w", "site": "west"},
               {"name": "n", "site": "north"}]
    spec = make_spec(sites=two, data={"sources": sources})
    st = step(spec, None).status
    edited = make_spec(sites=two[:1], data={"sources": sources[:2]})
    d = step(edited, st)
    assert d.status.phase == "Failed" and "north" in d.status.message


def test_requeue_after_is_when_a_backoff_ends():
    spec = make_spec()
    d = step(spec, training(spec, k=1).status, jobs={"r-p0-a1": JobObservation("Failed")})
    assert d.requeue_after == timedelta(seconds=10)
    assert step(spec, MeritRunStatus(phase="Succeeded")).requeue_after is None


@pytest.mark.parametrize(("planned", "bound"), [(40, 40), (0, None)])
def test_a_pull_sites_unknown_token_count_is_no_bound(planned, bound):
    from meritrun.api import PartitionStatus
    from meritrun.pipeline.jobs import partition_input

    part = PartitionStatus(name="p1", index=1, sources=["c"], site="west", attempt=1,
                           planned_tokens=planned)
    got = partition_input(RUN, make_spec(sites=[PULL]), part)
    assert got.source_tokens == bound and got.token_bound() == bound
