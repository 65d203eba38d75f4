"""Pull sites in the state machine: offers, verification, refusals, deadlines, sketches."""

from __future__ import annotations

from datetime import timedelta

import pytest
from support.decide import T0, created, make_spec, result, step

from meritrun.jobs import CreateJob
from meritrun.pipeline import JobObservation, OfferAssignment, RevokeGrant
from meritrun.stages import Plan, PlannedPartition, Verdict

SITE = {"name": "site-b", "mode": "pull", "deadlineSeconds": 1000}
PLAN = Plan(strategy="bySite", partitions=[
    PlannedPartition(name="p0", index=0, sources=["a"], tokens=10),
    PlannedPartition(name="p1", index=1, sources=["c"], tokens=10, site="site-b")])


def offers(d) -> list[OfferAssignment]:
    return [a for a in d.actions if isinstance(a, OfferAssignment)]


def revokes(d) -> list[RevokeGrant]:
    return [a for a in d.actions if isinstance(a, RevokeGrant)]


def awaiting(spec, *, at=0):
    d = step(spec, step(spec, None).status, at=at,
             jobs={"r-profile-a1": JobObservation("Succeeded")}, plan=PLAN)
    return d


def verdict(accepted: bool, attempt: int = 1, check: str | None = None) -> Verdict:
    return Verdict(partition="p1", attempt=attempt, accepted=accepted, check=check,
                   detail=None if accepted else "sha256 of model.safetensors differs")


def test_offer_names_the_attempt_prefix_and_is_repeated_until_the_artifact_arrives():
    spec = make_spec(sites=[SITE])
    d = awaiting(spec)
    p1 = d.status.partitions[1]
    assert p1.state == "AwaitingContribution" and p1.attempt == 1 and p1.grant == "r-p1-grant"
    [offer] = offers(d)
    assert offer.assignment.output == "runs/r/uid-1/partitions/p1/attempt-1"
    assert offer.assignment.sources == ["c"] and offer.grant == "r-p1-grant"
    assert offer.expires == T0 + timedelta(seconds=1000)  # the grant dies with the deadline
    again = step(spec, d.status, at=5)
    assert [o.assignment for o in offers(again)] == [offer.assignment]  # level-based, same one
    assert not [e for e in again.events if e.reason == "AwaitingContribution"]


def test_arrival_revokes_the_grant_and_verifies_before_it_counts():
    spec = make_spec(sites=[SITE])
    d = step(spec, awaiting(spec).status, partition_results={"p1": result("p1")},
             jobs={"r-p0-a1": JobObservation("Active")})
    p1 = d.status.partitions[1]
    assert p1.state == "Verifying" and created(d) == ["r-p1-verify-a1"]
    [rev] = revokes(d)
    assert rev.grant == "r-p1-grant" and rev.ref.attempt == 1
    verify = next(a for a in d.actions if isinstance(a, CreateJob))
    assert verify.params.output == "runs/r/uid-1/verdicts/p1/attempt-1"
    assert verify.params.partition.site == "site-b"
    assert not offers(d)
    # p0 finishes; the merge must wait for the verdict.
    d = step(spec, d.status, partition_results={"p0": result("p0")},
             jobs={"r-p1-verify-a1": JobObservation("Active")})
    assert "r-merge-a1" not in created(d)
    d = step(spec, d.status, verdicts={"p1": verdict(True)},
             jobs={"r-p1-verify-a1": JobObservation("Succeeded")})
    assert d.status.partitions[1].state == "Succeeded" and d.status.partitions[1].tokens == 90
    assert created(d) == ["r-merge-a1"]


def test_refused_contribution_is_reported_and_offered_again_as_next_attempt():
    spec = make_spec(sites=[SITE])
    d = step(spec, awaiting(spec).status, partition_results={"p1": result("p1")})
    d = step(spec, d.status, at=10, verdicts={"p1": verdict(False, check="sha256")})
    p1 = d.status.partitions[1]
    assert p1.state == "AwaitingContribution" and p1.attempt == 2
    assert "refused (sha256)" in p1.message and p1.artifact is None
    assert any(e.reason == "ContributionRefused" and e.type == "Warning" for e in d.events)
    [offer] = offers(d)
    assert offer.assignment.output == "runs/r/uid-1/partitions/p1/attempt-2"
    assert offer.expires == T0 + timedelta(seconds=1000)  # re-submission keeps the deadline


def test_refusals_past_the_retry_budget_fail_the_partition_and_the_quorum_decides():
    spec = make_spec(sites=[SITE], backoffLimit=0, merge={"quorum": 0.5})
    d = step(spec, awaiting(spec).status, partition_results={"p1": result("p1")})
    d = step(spec, d.status, verdicts={"p1": verdict(False, check="non-finite")},
             partition_results={"p0": result("p0")})
    assert d.status.partitions[1].state == "Failed"
    assert "non-finite" in d.status.partitions[1].message
    assert created(d) == ["r-merge-a1"]
    assert d.status.merge.included == ["p0"] and d.status.merge.left_out == ["p1"]


def test_missed_deadline_with_quorum_merges_without_the_site():
    spec = make_spec(sites=[SITE], merge={"quorum": 0.5})
    d = step(spec, awaiting(spec).status, at=10, partition_results={"p0": result("p0")})
    d = step(spec, d.status, at=1001)
    p1 = d.status.partitions[1]
    assert p1.state == "Failed" and "missed its deadline" in p1.message
    assert [r.grant for r in revokes(d)] == ["r-p1-grant"]
    assert created(d) == ["r-merge-a1"] and d.status.merge.left_out == ["p1"]


def test_verification_job_that_dies_without_verdict_backs_off_then_offers_again():
    spec = make_spec(sites=[SITE], backoffLimit=1)
    d = step(spec, awaiting(spec).status, partition_results={"p1": result("p1")})
    gone = step(spec, d.status)  # never seen: recreated under the same name
    assert "r-p1-verify-a1" in created(gone) and gone.status.partitions[1].state == "Verifying"
    d = step(spec, d.status, jobs={"r-p1-verify-a1": JobObservation("Failed", "OOMKilled")})
    p1 = d.status.partitions[1]
    assert p1.state == "BackingOff" and "OOMKilled" in p1.message and p1.attempt == 1
    assert offers(step(spec, d.status, at=5)) == []  # still backing off: no new grant
    d = step(spec, d.status, at=11)
    assert d.status.partitions[1].state == "AwaitingContribution"
    assert [o.assignment.attempt for o in offers(d)] == [2]
    d = step(spec, d.status, at=12, partition_results={"p1": result("p1", 2)})
    d = step(spec, d.status, at=13, jobs={"r-p1-verify-a2": JobObservation("Failed", "OOM")})
    assert d.status.partitions[1].state == "Failed"  # out of retries (backoffLimit 1)


@pytest.mark.parametrize("job", [JobObservation("Failed", "bad", permanent=True), None])
def test_verification_failing_permanently_or_vanishing_after_seen(job):
    spec = make_spec(sites=[SITE], backoffLimit=0)
    d = step(spec, awaiting(spec).status, partition_results={"p1": result("p1")})
    d = step(spec, d.status, jobs={"r-p1-verify-a1": JobObservation("Active")})
    d = step(spec, d.status, jobs={"r-p1-verify-a1": job} if job else {})
    assert d.status.partitions[1].state == "Failed" and not any("verify" in n for n in created(d))


def test_a_failed_run_revokes_grants_still_out():
    spec = make_spec(sites=[SITE], activeDeadlineSeconds=50)
    d = step(spec, awaiting(spec).status, at=60)
    assert d.status.phase == "Failed"
    assert [r.grant for r in revokes(d)] == ["r-p1-grant"]


# --- sketches ---------------------------------------------------------------------------------


def sketch_spec(**kw):
    return make_spec(sites=[{**SITE, "sketches": True}],
                     data={"sources": [{"name": "a", "uri": "s3://d/a.jsonl"},
                                       {"name": "c", "site": "site-b"}]},
                     partitioning={"strategy": "bySite", "axes": 1}, **kw)


def test_sketch_sites_are_asked_first_and_profiling_waits_for_them():
    spec = sketch_spec()
    d = step(spec, None)
    assert d.status.phase == "Profiling" and created(d) == []
    [offer] = offers(d)
    assert offer.assignment.kind == "sketch" and offer.assignment.sources == ["c"]
    assert offer.grant == "r-sketch-site-b-grant"
    assert d.status.sketches[0].state == "AwaitingContribution"
    d = step(spec, d.status, at=5, sketches={"site-b": "s3://merit/runs/r/uid-1/sketches/site-b/a1"})
    assert d.status.sketches[0].state == "Succeeded" and revokes(d)
    [job] = [a for a in d.actions if isinstance(a, CreateJob)]
    assert job.params.site_sketches == {"site-b": "runs/r/uid-1/sketches/site-b/attempt-1"}


def test_missing_sketches_fail_the_run_at_the_deadline():
    spec = sketch_spec()
    d = step(spec, step(spec, None).status, at=1001)
    assert d.status.phase == "Failed"
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "SketchesMissing"
    assert created(d) == []


def test_conflict_pca_over_pull_site_sources_is_an_invalid_spec():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="use strategy bySite"):
        make_spec(sites=[SITE], data={"sources": [{"name": "a", "uri": "s3://d/a.jsonl"},
                                                 {"name": "c", "site": "site-b"}]},
                  partitioning={"strategy": "conflictPCA", "axes": 1})


def test_sketches_from_a_site_without_sources_is_an_invalid_spec():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"sites\[0\].sketches: no source"):
        make_spec(sites=[{**SITE, "sketches": True}],
                  data={"sources": [{"name": "a", "uri": "s3://d/a.jsonl"}]})
