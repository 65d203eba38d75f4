"""The MeritRun status: what the pipeline has observed and decided.

Attempt counters and terminal states live here, never re-derived from which children exist,
so a deleted Job cannot reset a retry budget.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import ApiModel

Phase = Literal["Pending", "Profiling", "Training", "Merging", "Searching", "Succeeded",
                "Failed", "Suspended"]
StageState = Literal["Pending", "Running", "BackingOff", "Succeeded", "Failed"]
PartitionState = Literal["Pending", "Running", "BackingOff", "AwaitingContribution",
                         "Verifying", "Succeeded", "Failed"]
SketchState = Literal["AwaitingContribution", "Succeeded", "Failed"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type, e.g. Ready, Profiled, Trained, Merged.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(None, description="Spec generation observed.")


class ArtifactRef(ApiModel):
    """Where a stage's output lives and how to check it."""

    uri: str = Field(description="Storage URI of the artifact directory.")
    sha256: str | None = Field(None, description="sha256 of its manifest.json.")
    bytes: int | None = Field(None, ge=0, description="Total size of its files.")


class StageStatus(ApiModel):
    """One single-Job stage (profile, merge, search)."""

    state: StageState = Field("Pending", description="Stage state.")
    attempt: int = Field(0, ge=0, description="Current attempt (0 before the first).")
    job: str | None = Field(None, description="Job of the current attempt.")
    job_seen: bool | None = Field(None, description="The current attempt's Job was observed: "
                                  "if it vanishes now, the attempt failed.")
    retry_after: str | None = Field(None, description="Backoff end (RFC 3339).")
    start_time: str | None = Field(None, description="When the first attempt started.")
    completion_time: str | None = Field(None, description="When the stage finished.")
    message: str | None = Field(None, description="Last failure or refusal.")
    waiting: str | None = Field(None, description="Why the current Job makes no progress: "
                                "not admitted by its queue, image pull, unschedulable.")
    artifact: ArtifactRef | None = Field(None, description="The stage's output.")


class StageProgress(ApiModel):
    """How far a running stage is, from its own `progress.json` (shown, never decided on)."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    loss: float | None = Field(None, description="Training loss of the last step.")
    updated: str | None = Field(None, description="When the stage last wrote it (RFC 3339).")
    queued: bool | None = Field(None, description="Created but not started yet: waiting for a "
                                "free slot (local --parallel) or a queue.")


class PartitionStatus(StageStatus):
    """One partition of the mixture."""

    name: str = Field(description="Partition name (p0, p1, ...).")
    index: int = Field(ge=0, description="Partition index k (training seed = seed + k).")
    sources: list[str] = Field(description="Sources trained together in this partition.")
    site: str | None = Field(None, description="Site that trains it (none: this cluster).")
    tokens: int | None = Field(None, ge=0, description="Supervised tokens it trained on.")
    planned_tokens: int | None = Field(
        None, ge=0, description="Supervised tokens of its sources in the plan (one epoch): "
                                "a contribution may claim at most this times the epochs.")
    grant: str | None = Field(None, description="Pull sites: where the site's grant is (a "
                              "Secret of the run's namespace, or a file for local runs).")
    state: PartitionState = Field("Pending", description="Partition state.")  # type: ignore[assignment]
    progress: StageProgress | None = Field(None, description="Training progress while it runs.")


class SiteSketchStatus(ApiModel):
    """Gradient sketches a pull site uploads so profiling needs none of its data."""

    site: str = Field(description="The site.")
    state: SketchState = Field("AwaitingContribution", description="Sketch state.")
    attempt: int = Field(1, ge=1, description="Attempt of the sketch assignment.")
    start_time: str | None = Field(None, description="When the hub started waiting.")
    completion_time: str | None = Field(None, description="When the sketches arrived.")
    grant: str | None = Field(None, description="Where the site's grant is.")
    uri: str | None = Field(None, description="The uploaded sketches.")
    message: str | None = Field(None, description="Why it failed.")


class PlanSummary(ApiModel):
    """The partition plan chosen by the profile stage."""

    strategy: str = Field(description="Strategy used.")
    partitions: int = Field(ge=1, description="Number of partitions K.")
    explained_variance: list[float] | None = Field(None, description="Per PCA axis.")
    uri: str | None = Field(None, description="plan.json in storage.")


class MergeStatus(StageStatus):
    """The one merge."""

    method: str | None = Field(None, description="Merge method used.")
    included: list[str] | None = Field(None, description="Partitions merged.")
    left_out: list[str] | None = Field(None, description="Partitions left out (quorum).")


class SearchStatus(StageStatus):
    """Mixture search by merging."""

    best: dict[str, float] | None = Field(None, description="Best mixture weights by partition.")


class MeritRunStatus(ApiModel):
    """Observed state of a MeritRun."""

    phase: Phase = Field("Pending", description="Coarse phase for the printer column.")
    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    run_uid: str | None = Field(None, description="Identity of this run's results: they are "
                                "stored under runs/<name>/<runUid>/ and carry it.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    start_time: str | None = Field(None, description="When the run started.")
    completion_time: str | None = Field(None, description="When it reached a terminal phase.")
    progress: str | None = Field(None, description="Partitions done/total, e.g. 3/4.")
    profile: StageStatus = Field(default_factory=StageStatus, description="Profile stage.")
    sketches: list[SiteSketchStatus] | None = Field(None, description="Sketches from pull "
                                                    "sites (sites[].sketches).")
    plan: PlanSummary | None = Field(None, description="Chosen partition plan.")
    partitions: list[PartitionStatus] = Field(default_factory=list, description="Partitions.")
    merge: MergeStatus = Field(default_factory=MergeStatus, description="Merge stage.")
    search: SearchStatus | None = Field(None, description="Mixture search stage.")
    model_uri: str | None = Field(None, description="The merged model directory.")
    message: str | None = Field(None, description="Why the run is where it is.")
