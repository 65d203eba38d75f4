"""pydantic models of the MeritRun custom resource (spec and status).

No torch, no kopf: every image imports these. The CRD is generated from them (meritrun.crd).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ._base import ApiModel
from .places import DataSpec, ModelRef, SecretRef, SiteSpec, SourceSpec, StorageSpec
from .spec import (
    JobTemplate,
    LoraSpec,
    MergeSpec,
    MeritRunSpec,
    MixtureSearchSpec,
    OtaSpec,
    PartitioningSpec,
    ProfilingSpec,
    TrainingSpec,
)
from .status import (
    TERMINAL_PHASES,
    ArtifactRef,
    Condition,
    MergeStatus,
    MeritRunStatus,
    PartitionStatus,
    PlanSummary,
    SearchStatus,
    SiteSketchStatus,
    StageProgress,
    StageStatus,
)

KIND = "MeritRun"
PLURAL = "meritruns"
SHORT_NAME = "mr"


class ObjectMeta(ApiModel):
    """The parts of metadata MeritRun reads."""

    model_config = {**ApiModel.model_config, "extra": "allow"}
    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None


class MeritRun(ApiModel):
    """A whole MeritRun object as applied with kubectl."""

    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: MeritRunSpec
    status: MeritRunStatus | None = None

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> MeritRun:
        return cls.model_validate(body)


__all__ = [
    "KIND", "PLURAL", "SHORT_NAME", "TERMINAL_PHASES", "ApiModel", "ArtifactRef", "Condition",
    "DataSpec", "JobTemplate", "LoraSpec", "MergeSpec", "MergeStatus", "MeritRun",
    "MeritRunSpec", "MeritRunStatus", "MixtureSearchSpec", "ModelRef", "ObjectMeta", "OtaSpec",
    "PartitionStatus", "PartitioningSpec", "PlanSummary", "ProfilingSpec", "SearchStatus",
    "SecretRef", "SiteSketchStatus", "SiteSpec", "SourceSpec", "StageProgress", "StageStatus",
    "StorageSpec", "TrainingSpec",
]
