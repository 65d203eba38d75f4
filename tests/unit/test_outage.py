"""A short storage outage does not stop the local runner (issue 16): the round is retried later,
said once; only an outage past its bound stops the runner, saying how to resume."""

from __future__ import annotations

import logging

import pytest
import yaml

from meritrun import local
from meritrun.api import MeritRunStatus
from meritrun.cli import main
from meritrun.errors import TransientError
from meritrun.outage import Outage
from meritrun.pipeline import Decision


class FakeClock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_outage_waits_doubling_then_gives_up_naming_how_to_resume(caplog):
    clock = FakeClock()
    outage = Outage(limit_s=10, first_delay_s=0.5, max_delay_s=4, clock=clock,
                    sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="meritrun.outage"):
        for _ in range(5):
            outage.wait(TransientError("s3 down"))
        with pytest.raises(TransientError, match="still failing after 12 s: s3 down; run the "
                                                 "same command again to resume"):
            outage.wait(TransientError("s3 down"))
    assert clock.slept == [0.5, 1, 2, 4, 4]
    assert caplog.text.count("s3 down; running stages go on") == 1
    outage.clear()
    assert outage.since is None and outage.delay_s == 0.5


def test_run_local_rides_out_a_three_second_outage(tmp_path, monkeypatch, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": "r"},
        "spec": {"baseModel": {"uri": "base"}, "data": {"uri": "data.jsonl"}}}))
    failures = iter([TransientError("get runs/r/plan.json: cannot reach the server")] * 3)
    rounds = []

    def run_round(backend, spec, status, *, now, policy):
        rounds.append(now)
        error = next(failures, None)
        if error is not None:
            raise error
        return Decision(status=MeritRunStatus(phase="Succeeded"))

    monkeypatch.setattr(local, "run_round", run_round)
    assert main(["run", str(tmp_path / "run.yaml"), "--local",
                 "--workdir", str(tmp_path / "work")]) == 0
    assert len(rounds) == 4
    assert (rounds[-1] - rounds[0]).total_seconds() >= 3.0  # 0.5 + 1 + 2 s of waiting
    assert "phase: Succeeded" in capsys.readouterr().out
