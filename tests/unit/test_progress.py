"""Progress you can see (issue 12, point 8): the stage's progress.json copied into the
partition status after `decide`, queued jobs shown Pending, and the local view's line with
step, total and loss."""

from __future__ import annotations

import json

from meritrun.api import MeritRunStatus, PartitionStatus, PlanSummary, StageProgress
from meritrun.artifacts import RunId, partition_prefix
from meritrun.observe import attach_progress
from meritrun.progress import progress_key, read_progress
from meritrun.runner_cli import print_summary, running_detail, shown_state
from meritrun.storage import open_storage


def write_progress(storage, prefix: str, step: int, total: int, loss: float) -> None:
    """What the train stage's ProgressFile writes (merit_trainer.publishing)."""
    body = {"stage": "train", "step": step, "total": total, "loss": loss,
            "updated": "2026-01-01T00:00:00+00:00"}
    storage.put_bytes(progress_key(prefix), json.dumps(body).encode())


def test_read_progress_gives_step_total_loss_and_time(tmp_path):
    storage = open_storage(tmp_path.as_uri())
    write_progress(storage, "runs/r/partitions/p0/attempt-1", 3, 10, 1.5)
    got = read_progress(storage, "runs/r/partitions/p0/attempt-1")
    assert (got.step, got.total, got.loss, got.updated, got.queued) == (
        3, 10, 1.5, "2026-01-01T00:00:00+00:00", None)


def test_unreadable_or_missing_progress_is_none(tmp_path):
    storage = open_storage(tmp_path.as_uri())
    assert read_progress(storage, "runs/r/partitions/p0/attempt-1") is None
    storage.put_bytes(progress_key("x"), b"{not json")
    assert read_progress(storage, "x") is None


def _status(*parts: PartitionStatus) -> MeritRunStatus:
    return MeritRunStatus(phase="Training", partitions=list(parts),
                          plan=PlanSummary(strategy="manual", partitions=len(parts)))


def test_attach_progress_reads_running_partitions_and_marks_queued_ones(tmp_path):
    storage = open_storage(tmp_path.as_uri())
    run = RunId("r", "u1")
    write_progress(storage, partition_prefix(run, "p0", 2), 4, 9, 0.75)
    status = _status(
        PartitionStatus(name="p0", index=0, sources=["a"], state="Running", attempt=2,
                        job="r-p0-a2"),
        PartitionStatus(name="p1", index=1, sources=["b"], state="Running", attempt=1,
                        job="r-p1-a1"),
        PartitionStatus(name="p2", index=2, sources=["c"], state="Succeeded", attempt=1,
                        progress=StageProgress(step=9, total=9, loss=0.1)))
    attach_progress(storage, run, status, queued=frozenset({"r-p1-a1"}))
    p0, p1, p2 = status.partitions
    assert (p0.progress.step, p0.progress.total, p0.progress.loss) == (4, 9, 0.75)
    assert p1.progress == StageProgress(queued=True)
    assert p2.progress.step == 9  # not running: keeps its last progress
    assert [shown_state(p) for p in status.partitions] == ["Running", "Pending", "Succeeded"]
    assert running_detail(status) == "p0 step 4/9 loss 0.750, p1 Pending"
    # once started, a queued partition is Running again (no stale "queued")
    attach_progress(storage, run, status, queued=frozenset())
    assert status.partitions[1].progress is None and shown_state(status.partitions[1]) == "Running"


def test_summary_shows_a_queued_partition_as_pending(capsys):
    status = _status(PartitionStatus(name="p1", index=1, sources=["b"], state="Running",
                                     attempt=1, progress=StageProgress(queued=True)))
    print_summary(status)
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.split()[:2] == ["p1", "Pending"]


def test_status_round_trips_progress_through_the_wire_format():
    status = _status(PartitionStatus(name="p0", index=0, sources=["a"], state="Running",
                                     attempt=1, progress=StageProgress(step=1, total=2,
                                                                       loss=0.5)))
    wire = status.to_wire()
    assert wire["partitions"][0]["progress"] == {"step": 1, "total": 2, "loss": 0.5}
    assert MeritRunStatus.model_validate(wire) == status
