"""Operator metrics: names, units, bounded labels, and counts derived from status changes."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from merit_operator.metrics import PHASES, Metrics, phase_counts
from meritrun.api import ArtifactRef, MergeStatus, MeritRunStatus, PartitionStatus, StageStatus
from meritrun.errors import SpecError, TransientError


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def part(name: str, state: str, attempt: int = 1, size: int | None = None,
         message: str | None = None) -> PartitionStatus:
    return PartitionStatus(name=name, index=int(name[1:]), sources=["s"], state=state,
                           attempt=attempt, message=message,
                           artifact=ArtifactRef(uri="s3://b/x", bytes=size) if size else None)


def test_every_metric_is_ours_in_base_units_with_bounded_labels():
    m = Metrics()
    families = list(text_string_to_metric_families(m.exposition().decode()))
    assert families and all(f.name.startswith("meritrun_") for f in families)
    for f in families:
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples)
        for s in f.samples:
            assert set(s.labels) <= {"handler", "kind", "phase", "stage", "result", "le",
                                     "version", "python"}, s
    names = {f.name for f in families}
    assert {"meritrun_reconcile_duration_seconds", "meritrun_merge_duration_seconds",
            "meritrun_artifact_uploaded_bytes", "meritrun_runs"} <= names


def test_round_counts_times_and_classifies_errors():
    m = Metrics()
    with m.round("daemon"):
        pass
    for error in (TransientError("net"), SpecError("bad"), RuntimeError("bug")):
        with pytest.raises(type(error)), m.round("daemon"):
            raise error
    assert value(m, "meritrun_reconcile_total", handler="daemon") == 4
    assert value(m, "meritrun_reconcile_duration_seconds_count", handler="daemon") == 4
    for kind in ("transient", "spec", "internal"):
        assert value(m, "meritrun_reconcile_errors_total", handler="daemon", kind=kind) == 1


def test_runs_by_phase_follow_each_run():
    m = Metrics()
    m.set_phase("a", "Training")
    m.set_phase("b", "Training")
    m.set_phase("a", "Succeeded")
    counts = phase_counts(m)
    assert counts["Training"] == 1 and counts["Succeeded"] == 1
    assert set(counts) == set(PHASES)
    m.forget("b")
    assert phase_counts(m)["Training"] == 0


def test_transitions_count_successes_failures_retries_and_bytes():
    m = Metrics()
    old = MeritRunStatus(phase="Training", partitions=[part("p0", "Running"),
                                                       part("p1", "Running")])
    new = MeritRunStatus(phase="Training", partitions=[part("p0", "Succeeded", size=1000),
                                                       part("p1", "BackingOff")])
    m.record_transition(old, new)
    m.record_transition(old, new)  # the same change seen twice is counted twice...
    m.record_transition(new, new)  # ...but an unchanged status adds nothing
    assert value(m, "meritrun_partition_jobs_total", result="succeeded") == 2
    assert value(m, "meritrun_partition_jobs_total", result="failed") == 2
    assert value(m, "meritrun_artifact_uploaded_bytes_total") == 2000
    retried = MeritRunStatus(phase="Training", partitions=[part("p0", "Succeeded", size=1000),
                                                           part("p1", "Running", attempt=2)])
    m.record_transition(new, retried)
    assert value(m, "meritrun_retries_total", stage="train") == 1


def test_a_finished_merge_counts_verified_bytes_refusals_and_duration():
    m = Metrics()
    parts = [part("p0", "Succeeded", size=300), part("p1", "Succeeded", size=500)]
    old = MeritRunStatus(phase="Merging", partitions=parts,
                         merge=MergeStatus(state="Running", attempt=1, included=["p0", "p1"],
                                           start_time="2026-01-01T00:00:00Z"))
    refused = [parts[0], part("p1", "Succeeded", size=500, message="refused by merge: hash")]
    new = MeritRunStatus(phase="Succeeded", partitions=refused, merge=MergeStatus(
        state="Succeeded", attempt=1, included=["p0"], start_time="2026-01-01T00:00:00Z",
        completion_time="2026-01-01T00:01:30Z"), profile=StageStatus(state="Succeeded",
                                                                     attempt=1))
    m.record_transition(old, new)
    assert value(m, "meritrun_artifact_verified_bytes_total") == 300
    assert value(m, "meritrun_artifact_verification_failures_total") == 1
    assert value(m, "meritrun_merge_duration_seconds_sum") == 90
    assert value(m, "meritrun_retries_total", stage="merge") == 0


def test_build_info_names_the_version():
    import meritrun

    m = Metrics()
    assert value(m, "meritrun_build_info", version=meritrun.__version__,
                 python=__import__("platform").python_version()) == 1


def test_pull_site_verdicts_are_counted_and_a_resubmission_is_not_a_retry():
    m = Metrics()
    verifying = MeritRunStatus(phase="Training", partitions=[part("p0", "Verifying")])
    refused = MeritRunStatus(phase="Training", partitions=[
        part("p0", "AwaitingContribution", attempt=2)])
    accepted = MeritRunStatus(phase="Training", partitions=[part("p0", "Succeeded", size=10)])
    m.record_transition(verifying, refused)
    m.record_transition(verifying, accepted)
    m.record_transition(accepted, accepted)
    assert value(m, "meritrun_site_contributions_total", result="refused") == 1
    assert value(m, "meritrun_site_contributions_total", result="accepted") == 1
    assert value(m, "meritrun_retries_total", stage="train") == 0
    m.grant_issued()
    assert value(m, "meritrun_site_grants_issued_total") == 1
