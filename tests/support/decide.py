"""Helpers for driving `meritrun.pipeline.decide` round by round in unit tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meritrun.api import ArtifactRef, MeritRunSpec
from meritrun.artifacts import RunId
from meritrun.jobs import CreateJob
from meritrun.pipeline import Observed, PartitionResult, Policy, decide

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
RUN = RunId("r", "uid-1")
POLICY = Policy(backoff_base_seconds=10, backoff_max_seconds=60)


def make_spec(**overrides) -> MeritRunSpec:
    body = {"baseModel": {"uri": "s3://m/base"}, "data": {"uri": "s3://d/mix.jsonl"},
            "storage": {"uri": "s3://merit"}, "partitioning": {"strategy": "random", "axes": 1}}
    body.update(overrides)
    return MeritRunSpec.model_validate(body)


def result(name: str, attempt: int = 1) -> PartitionResult:
    return PartitionResult(tokens=90, artifact=ArtifactRef(uri=f"s3://merit/{name}/a{attempt}"))


def step(spec, status, *, at=0, **observed):
    """One round at T0 + `at` seconds with the given observations."""
    observed.setdefault("generation", 1)
    obs = Observed(run=RUN, now=T0 + timedelta(seconds=at), **observed)
    return decide(spec, status, obs, policy=POLICY)


def created(decision) -> list[str]:
    return [a.name for a in decision.actions if isinstance(a, CreateJob)]
