"""Stage parameters: the contract between a backend and the images' entry points.

A backend (local processes or Kubernetes Jobs) writes one of these as JSON (a file locally, a
ConfigMap in Kubernetes) and runs the stage command with `--params PATH`. Credentials never
travel here: S3 keys reach a stage only through its environment (the spec's Secret).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .api import (
    DataSpec,
    MergeSpec,
    MeritRunSpec,
    MixtureSearchSpec,
    PartitioningSpec,
    ProfilingSpec,
    TrainingSpec,
)
from .artifacts import RunId

PARAMS_ENV = "MERITRUN_PARAMS"


class StorageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str = Field(description="Storage root: s3://bucket/prefix or file:///path.")
    endpoint: str | None = None
    region: str | None = None


def run_fields(run: RunId) -> dict[str, str]:
    """The `run` and `run_uid` of every stage's parameters (and of an assignment)."""
    return {"run": run.name, "run_uid": run.uid}


def storage_params(spec: MeritRunSpec) -> StorageParams:
    """The run's storage as every stage sees it (resolved: the local default already set)."""
    if spec.storage is None:
        raise ValueError("spec.storage must be resolved before building jobs")
    return StorageParams(uri=spec.storage.root_uri(), endpoint=spec.storage.endpoint,
                         region=spec.storage.region)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    run: str
    run_uid: str = Field(description="The run's uid (artifacts.RunId): written into every "
                         "manifest, plan and report, checked on read.")
    attempt: int = Field(ge=1)
    storage: StorageParams
    base_model: str = Field(description="URI of the base model directory.")
    output: str = Field(description="Key prefix (under storage) this attempt writes.")


class ProfileParams(_Params):
    stage: str = "profile"
    data: DataSpec
    profiling: ProfilingSpec
    partitioning: PartitioningSpec
    sites: dict[str, str] = Field(default_factory=dict, description="source -> site binding.")
    site_sketches: dict[str, str] = Field(
        default_factory=dict,
        description="site -> key prefix (under storage) of the gradient sketches it uploaded "
                    "for its own sources (sketch.npy + sketch.json): profiling without its data.")
    max_seq_len: int = Field(512, ge=8, description="Truncation used to count tokens (training's).")


class TrainParams(_Params):
    stage: str = "train"
    partition: str
    index: int = Field(ge=0)
    sources: list[str]
    site: str | None = None
    data: DataSpec
    training: TrainingSpec
    checkpoints: str | None = Field(
        None, description="Key prefix (under storage; artifacts.checkpoint_prefix) where "
        "checkpoints are also kept, so an attempt on a fresh work directory resumes. None: "
        "the work directory alone keeps them (a workVolume PVC, the local runner's directory).")


class PartitionInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    prefix: str = Field(description="Key prefix of the partition artifact (with attempt).")
    attempt: int | None = Field(None, ge=1, description="The attempt the prefix holds.")
    run_uid: str | None = Field(None, description="The run whose artifact it must be "
                                "(manifest.run_uid); another run's is refused.")
    site: str | None = Field(None, description="Site expected to have trained it (manifest.site).")
    public_key: str | None = Field(
        None, description="The site's registered ed25519 key: the manifest must carry a valid "
                          "signature by it.")
    sources: list[str] | None = Field(
        None, description="The plan's sources of this partition: the manifest must name them.")
    source_tokens: int | None = Field(
        None, ge=0, description="Supervised tokens of those sources in the plan (one epoch).")
    epochs: float | None = Field(None, gt=0, description="Epochs the partition trains for.")

    def token_bound(self) -> int | None:
        """The most supervised tokens the plan's sources can give: their tokens times the
        epochs, rounded up to whole epochs as the trainer's last partial batch may be (None
        when the plan's counts are not given)."""
        if self.source_tokens is None or self.epochs is None:
            return None
        return self.source_tokens * math.ceil(self.epochs - 1e-9)


class MergeParams(_Params):
    stage: str = "merge"
    partitions: list[PartitionInput]
    merge: MergeSpec
    planned: int | None = Field(None, ge=1, description="Partitions in the plan: the quorum "
                                "counts over these, not over the partitions sent here.")
    required: int | None = Field(None, ge=1, description="Accepted contributions needed "
                                 "(meritrun.pipeline.quorum); the merge refuses below it.")
    held_out: str | None = Field(None, description="Held-out JSONL URI for the report.")


class VerifyParams(_Params):
    """Check one contribution when it arrives, before it counts (pull sites).

    `output` is the verdict prefix (artifacts.verdict_prefix); the stage writes
    `{output}/verdict.json` (a Verdict) and exits 0 whether it accepts or refuses.
    """

    stage: str = "verify"
    partition: PartitionInput
    merge: MergeSpec = Field(description="Method (OTA needs second moments) and tolerances.")


class Verdict(BaseModel):
    """verdict.json: the hub's verdict on one contribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str = "meritrun.verdict/v1"
    run_uid: str | None = Field(None, description="The run it judged for.")
    partition: str
    attempt: int
    accepted: bool
    check: str | None = Field(None, description="The failed check (refusals).")
    detail: str | None = Field(None, description="What was wrong, for the status.")
    manifest_sha256: str | None = Field(None, description="sha256 of the manifest it judged.")
    token_bound: int | None = Field(
        None, description="The most supervised tokens the plan's sources can give (the claim "
                          "was checked against it).")


class SearchParams(_Params):
    stage: str = "search"
    partitions: list[PartitionInput]
    search: MixtureSearchSpec
    held_out: str = Field(description="Held-out JSONL URI scoring the candidates.")


class PlannedPartition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    index: int
    sources: list[str]
    tokens: int = Field(ge=0, description="Supervised tokens of its sources (one epoch).")
    site: str | None = None


class Plan(BaseModel):
    """plan.json: the partition plan written by the profile stage."""

    model_config = ConfigDict(extra="allow", frozen=True)
    run_uid: str | None = Field(None, description="The run it was made for.")
    strategy: str
    partitions: list[PlannedPartition]
    source_tokens: dict[str, int] = Field(default_factory=dict)
    scores: dict[str, list[float]] | None = None
    explained_variance: list[float] | None = None
    settings: dict = Field(default_factory=dict)


@dataclass(frozen=True)
class StageDef:
    """One stage: what it is given, which image runs it, and its entry module."""

    params: type[_Params]
    image: Literal["trainer", "merger"]
    module: str

    @property
    def gpu(self) -> bool:
        return self.image == "trainer"


# The one stage table: Job builders (meritrun.pipeline.jobs), both backends (stage_command),
# the operator's image choice and each image's params loader read it. A new stage is one
# entry here, one params model above, one step in meritrun.pipeline.steps.
STAGES: dict[str, StageDef] = {
    "profile": StageDef(ProfileParams, "trainer", "merit_trainer.stage"),
    "train": StageDef(TrainParams, "trainer", "merit_trainer.stage"),
    "merge": StageDef(MergeParams, "merger", "merit_merger.stage"),
    "search": StageDef(SearchParams, "merger", "merit_merger.stage"),
    "verify": StageDef(VerifyParams, "merger", "merit_merger.stage"),
}
STAGE_MODULES = {name: d.module for name, d in STAGES.items()}


def stages_of(image: str) -> dict[str, type[_Params]]:
    """stage -> params model of the stages an image runs (its entry point's loader)."""
    return {name: d.params for name, d in STAGES.items() if d.image == image}


def stage_command(stage: str, params_path: str, *, python: str = "python") -> list[str]:
    """argv that runs a stage, identical for a local process and a Job's container."""
    return [python, "-m", STAGES[stage].module, stage, "--params", params_path]


def partition_name(index: int) -> str:
    return f"p{index}"
