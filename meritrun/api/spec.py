"""The MeritRun spec: what a user asks for. Every field is documented; the CRD is generated
from these models (meritrun.crd), so the descriptions here are what `kubectl explain` shows.

Each cross-field rule is written twice on purpose, side by side: as a pydantic validator (for
`meritrun validate`, the local runner and the operator) and as a CEL rule in the same model's
`x-kubernetes-validations` (so `kubectl apply` refuses the object at admission). Counts and
sizes are bounded by meritrun.api.limits.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from ..errors import SpecError
from . import limits as lim
from ._base import SpecModel
from .fields import DNS_SUBDOMAIN, MAP_BY_NAME, Assignment, SourceName, cel, section, seed_field
from .places import DataSpec, ModelRef, SiteSpec, StorageSpec
from .rules import check_spec, spec_validations

PartitionStrategy = Literal["conflictPCA", "random", "manual", "bySite"]
MergeMethodName = Literal["tokenWeighted", "uniform", "taskArithmetic", "ties", "dare", "ota"]


class ProfilingSpec(SpecModel):
    """Gradient-conflict profiling at the base model (MERIT)."""

    calibration_samples: int = Field(200, ge=1, le=lim.MAX_CALIBRATION_SAMPLES,
                                     description="Examples drawn per source (n).")
    stride: int = Field(5, ge=1, le=lim.MAX_STRIDE,
                        description="Take every stride-th example before drawing (s).")
    projection_dim: int = Field(8192, ge=16, le=lim.MAX_PROJECTION_DIM,
                                description="Dimension of the shared JL sketch.")
    parameters: str = Field(
        "attention", min_length=1, max_length=1024,
        description="Parameter filter: attention, all, or a regex over names.",
    )
    centered: bool = Field(True, description="Double-centre the conflict matrix before PCA.")
    micro_batch_size: int = Field(8, ge=1, le=lim.MAX_BATCH,
                                  description="Examples per backward pass.")
    seed: int = seed_field("Seed of calibration sampling and of the projection")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Compute precision of the profiling gradients (bf16 for large "
        "models on GPUs; the sketch always accumulates in fp32).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory).")


class PartitioningSpec(SpecModel):
    """How sources are grouped into partitions."""

    model_config = cel(("!has(self.strategy) || self.strategy != 'manual' || "
                         "(has(self.assignments) && size(self.assignments) > 0)",
                         "strategy manual needs partitioning.assignments"))

    strategy: PartitionStrategy = Field(
        "conflictPCA", description="Split strategy: conflictPCA, random, manual or bySite.")
    axes: int = Field(2, ge=0, le=lim.MAX_AXES,
                      description="PCA axes r; conflictPCA gives K = 2^axes.")
    partitions: int | None = Field(
        None, ge=1, le=lim.MAX_PARTITIONS,
        description="K for random/bySite (default 2^axes); fewer when there are fewer "
                    "sources (or source groups) than K.",
    )
    assignments: list[Assignment] | None = Field(
        None, max_length=lim.MAX_PARTITIONS,
        description="manual: the sources of each partition (each source exactly once).",
    )
    seed: int = seed_field("Seed of random splits and tie-breaking")

    @model_validator(mode="after")
    def _manual_needs_assignments(self) -> PartitioningSpec:
        if self.strategy == "manual" and not self.assignments:
            raise ValueError("strategy manual needs partitioning.assignments")
        return self

    def partition_count(self) -> int:
        if self.strategy == "manual":
            return len(self.assignments or [])
        return self.partitions or 2**self.axes


class LoraSpec(SpecModel):
    """LoRA settings when training.method is lora."""

    rank: int = Field(8, ge=1, le=lim.MAX_LORA_RANK, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    target_modules: list[SourceName] | None = Field(None, max_length=256,
                                             description="Module names to adapt.")


class TrainingSpec(SpecModel):
    """How each partition is trained from the base model (no communication between them)."""

    model_config = cel(("!has(self.microBatchSize) || !has(self.batchSize) || "
                         "(self.microBatchSize <= self.batchSize && "
                         "self.batchSize % self.microBatchSize == 0)",
                         "microBatchSize must divide batchSize"))

    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA.")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW peak learning rate.")
    epochs: float = Field(1.0, gt=0, le=lim.MAX_EPOCHS,
                          description="Passes over the partition's examples.")
    batch_size: int = Field(8, ge=1, le=lim.MAX_BATCH, description="Examples per optimizer step.")
    max_seq_len: int = Field(512, ge=8, le=lim.MAX_SEQ_LEN,
                             description="Tokens per example after truncation.")
    max_steps: int | None = Field(None, ge=1, le=lim.MAX_STEPS,
                                  description="Cap on optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Linear warm-up share of steps.")
    second_moments: Literal["none", "rank1", "full"] = Field(
        "rank1", description="Save Adam exp_avg_sq for OTA: rank-1 factors, full, or none."
    )
    seed: int = seed_field("Base seed; partition k trains with seed + k")
    lora: LoraSpec | None = Field(None, description="LoRA settings (method lora).")
    micro_batch_size: int | None = Field(
        None, ge=1, le=lim.MAX_BATCH,
        description="Examples per forward pass and process (gradient accumulation up to "
                    "batchSize); must divide batchSize. Default: batchSize.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% "
        "more compute).")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; null: no clipping.")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Learning-rate decay after the linear warm-up.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute precision: auto is bf16 (fp32 master weights) on GPUs, "
        "fp32 on CPUs; fp32 is IEEE fp32 on GPUs too (no TF32 matmuls).")
    nodes: int = Field(
        1, ge=1, le=lim.MAX_NODES,
        description="Nodes (pods) per partition; each runs one process per GPU.")

    @model_validator(mode="after")
    def _micro_batches(self) -> TrainingSpec:
        micro = self.micro_batch_size
        if micro is not None and micro > self.batch_size:
            raise ValueError(f"training.microBatchSize {micro} is larger than "
                             f"training.batchSize {self.batch_size}")
        if micro is not None and self.batch_size % micro:
            raise ValueError(f"training.microBatchSize {micro} does not divide "
                             f"training.batchSize {self.batch_size}")
        return self


class JobTemplate(SpecModel):
    """What every stage Job's pod gets."""

    image: str | None = Field(None, max_length=1024,
                              description="Trainer image (merge uses mergeImage).")
    merge_image: str | None = Field(None, max_length=1024, description="Merger image.")
    resources: dict[str, Any] | None = Field(
        None, description="Container resources, e.g. limits nvidia.com/gpu."
    )
    node_selector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(None, max_length=64,
                                                     description="Pod tolerations.")
    service_account_name: str | None = Field(None, max_length=253,
                                             description="Pod service account.")
    env: list[dict[str, Any]] | None = Field(None, max_length=256,
                                             description="Extra container env entries.")
    queue_name: str | None = Field(None, max_length=253,
                                   description="Kueue LocalQueue (adds the queue label).")
    ttl_seconds_after_finished: int | None = Field(
        3600, ge=0, le=lim.MAX_DEADLINE_S,
        description="Delete finished Jobs after this many seconds."
    )
    work_volume: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN,
        description="PersistentVolumeClaim mounted at the stage's work directory, so "
        "training checkpoints survive into the next attempt (emptyDir when unset).")


class OtaSpec(SpecModel):
    """Curvature-aware OTA merge parameters."""

    power: float = Field(0.5, gt=0, description="Exponent p on the second moments.")
    epsilon: float = Field(1e-26, ge=0, description="Added to v^p; must stay tiny.")
    density: float | None = Field(
        None, gt=0, le=1, description="FFG: keep this fraction of elements per expert."
    )


class MergeSpec(SpecModel):
    """The one merge of all partitions."""

    method: MergeMethodName = Field("tokenWeighted", description="Merge method.")
    quorum: float = Field(1.0, gt=0, le=1, description="Fraction of partitions needed to merge.")
    ota: OtaSpec | None = Field(None, description="OTA parameters (method ota).")
    density: float | None = Field(None, gt=0, le=1, description="TIES/DARE density.")
    scale: float = Field(1.0, gt=0, description="Task-arithmetic/TIES scaling lambda.")
    outlier_factor: float = Field(
        5.0, gt=1, description="Flag updates whose norm is this far from the median."
    )
    refuse_outliers: bool = Field(False, description="Refuse (not just flag) outliers.")
    shard_size_mb: int = Field(2000, ge=1, le=lim.MAX_SHARD_MB,
                               description="Output shard size in MB.")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where the merge math runs: cuda needs a GPU in the merge Job; auto "
                           "uses one when the Job has it.")


class MixtureSearchSpec(SpecModel):
    """Rank candidate mixtures by merging the partitions (merge-as-proxy)."""

    enabled: bool = Field(False, description="Run the search after training.")
    grid: int = Field(8, ge=2, le=lim.MAX_GRID,
                      description="Simplex lattice denominator (every weight a multiple of "
                                  f"1/grid; at most {lim.MAX_SEARCH_CANDIDATES} candidates).")
    dirichlet: int | None = Field(None, ge=1, le=lim.MAX_SEARCH_CANDIDATES,
                                  description="Use N Dirichlet draws instead.")
    seed: int = seed_field("Seed of the Dirichlet draws")
    objective: Literal["mean-loss", "mean-accuracy", "weighted"] = Field(
        "mean-loss", description="What ranks the candidates."
    )


class MeritRunSpec(SpecModel):
    """A MeritRun: split, train in isolation, merge once."""

    model_config = ConfigDict(**SpecModel.model_config, json_schema_extra={
        "x-kubernetes-validations": spec_validations()})

    base_model: ModelRef = Field(description="The merge-ready base checkpoint theta0.")
    data: DataSpec = Field(description="The instruction-tuning mixture.")
    storage: StorageSpec | None = Field(None, description="Artifact storage (local default).")
    profiling: ProfilingSpec = section(ProfilingSpec)
    partitioning: PartitioningSpec = section(PartitioningSpec)
    training: TrainingSpec = section(TrainingSpec)
    template: JobTemplate = section(JobTemplate)
    sites: list[SiteSpec] | None = Field(
        None, max_length=lim.MAX_SITES, json_schema_extra=MAP_BY_NAME,
        description="Other sites that train partitions; names are unique.")
    merge: MergeSpec = section(MergeSpec)
    mixture_search: MixtureSearchSpec = section(MixtureSearchSpec)
    backoff_limit: int = Field(2, ge=0, le=lim.MAX_BACKOFF,
                               description="Retries per Job before it counts as failed.")
    active_deadline_seconds: int | None = Field(None, ge=1, le=lim.MAX_DEADLINE_S,
                                                description="Fail after this long.")
    suspend: bool = Field(False, description="Create no new Jobs while true.")
    delete_artifacts: bool = Field(False, description="Delete artifacts with the run.")

    def site(self, name: str | None) -> SiteSpec:
        """The site named `name`; SpecError when spec.sites has none by that name."""
        for s in self.sites or []:
            if s.name == name:
                return s
        raise SpecError(f"site {name!r} is not in spec.sites", path="spec.sites")

    def site_mode(self, name: str | None) -> str | None:
        """The mode of a partition's site; None for this cluster (or a site no longer listed)."""
        return next((s.mode for s in self.sites or [] if s.name == name), None)

    @model_validator(mode="after")
    def _consistent(self) -> MeritRunSpec:
        check_spec(self)
        return self
