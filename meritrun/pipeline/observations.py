"""What a backend observed in one round: child Jobs from the cluster, stage outputs from
storage, live grants from the grant store, and whether the spec is valid. Plain frozen data;
`decide` reads it, backends fill it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ..api import ArtifactRef
from ..artifacts import RunId
from ..errors import ExitCode
from ..stages import Plan, Verdict
from .actions import GrantRef

JobState = Literal["Active", "Succeeded", "Failed"]


@dataclass(frozen=True)
class JobObservation:
    state: JobState
    message: str | None = None
    # Why an Active Job makes no progress (held by its queue, image pull, unschedulable).
    waiting: str | None = None
    permanent: bool = False  # the stage said retrying cannot help (bad input, missing file)
    cluster: str | None = None  # where it was seen (a kubeconfig site), None for this cluster
    invalid_spec: bool = False  # the stage said the spec asks for what it cannot do


def exit_verdict(code: int | None) -> dict[str, bool]:
    """What a failed stage's exit code says about retrying (JobObservation's fields)."""
    return {"permanent": code in (ExitCode.PERMANENT, ExitCode.INVALID_SPEC),
            "invalid_spec": code == ExitCode.INVALID_SPEC}


@dataclass(frozen=True)
class PartitionResult:
    """A complete artifact (its manifest exists) for a partition's current attempt."""

    tokens: int
    artifact: ArtifactRef


@dataclass(frozen=True)
class MergeOutcome:
    """What the merge stage reported (merge_report.json), success or not."""

    model_uri: str | None
    refused: Mapping[str, str] = field(default_factory=dict)  # partition -> reason


@dataclass(frozen=True)
class Observed:
    """Everything a backend saw this round, read from the cluster, storage and grant store."""

    run: RunId  # name and uid: the uid picks this run's results in storage
    now: datetime
    generation: int | None = None
    jobs: Mapping[str, JobObservation] = field(default_factory=dict)
    plan: Plan | None = None
    plan_uri: str | None = None
    partition_results: Mapping[str, PartitionResult] = field(default_factory=dict)
    merge_outcome: MergeOutcome | None = None
    search_best: Mapping[str, float] | None = None
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)  # partition -> its verdict
    sketches: Mapping[str, str] = field(default_factory=dict)  # site -> uri of its sketches
    grants: Mapping[str, GrantRef] = field(default_factory=dict)  # live grants, by grant name
    spec_error: str | None = None  # the spec does not validate: "path: why"
