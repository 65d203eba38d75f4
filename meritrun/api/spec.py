"""The MeritRun spec: what a user asks for. Every field is documented; the CRD is generated
from these models (meritrun.crd), so the descriptions here are what `kubectl explain` shows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ._base import ApiModel

PartitionStrategy = Literal["conflictPCA", "random", "manual", "bySite"]
MergeMethodName = Literal["tokenWeighted", "uniform", "taskArithmetic", "ties", "dare", "ota"]
SiteMode = Literal["pull", "kubeconfig"]


class SecretRef(ApiModel):
    """A Secret in the run's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret.")


class ModelRef(ApiModel):
    """A Hugging Face model directory (config, safetensors weights, tokenizer)."""

    uri: str = Field(
        min_length=1,
        description="Where the model directory lives: s3://bucket/prefix, file:///path or a path.",
    )


class SourceSpec(ApiModel):
    """One data source stored on its own, possibly at another site."""

    name: str = Field(min_length=1, description="Source name, as in the examples' source field.")
    uri: str | None = Field(None, description="JSONL file of this source; omit at pull sites.")
    site: str | None = Field(None, description="Site that holds this source's data.")


class DataSpec(ApiModel):
    """The instruction-tuning mixture: JSON Lines with a source field."""

    uri: str | None = Field(None, description="One JSONL file holding every source.")
    source_field: str = Field("source", description="Field of each example naming its source.")
    sources: list[SourceSpec] | None = Field(
        None, description="Sources stored separately (alternative to uri)."
    )
    held_out_uri: str | None = Field(None, description="Held-out JSONL for evaluation reports.")

    @model_validator(mode="after")
    def _one_location(self) -> DataSpec:
        if self.uri is None and not self.sources:
            raise ValueError("set either data.uri or data.sources")
        return self


class StorageSpec(ApiModel):
    """Object storage shared by every stage: S3-compatible (MinIO) or a local directory."""

    uri: str | None = Field(
        None, description="Root of the run's artifacts: s3://bucket/prefix or file:///path."
    )
    endpoint: str | None = Field(None, description="S3 endpoint URL, e.g. http://minio:9000.")
    bucket: str | None = Field(None, description="Bucket (when uri is not given).")
    region: str | None = Field(None, description="S3 region, if the server needs one.")
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; mounted into Jobs.",
    )

    def root_uri(self) -> str:
        if self.uri:
            return self.uri.rstrip("/")
        if self.bucket:
            return f"s3://{self.bucket}"
        raise ValueError("storage needs uri or bucket")


class ProfilingSpec(ApiModel):
    """Gradient-conflict profiling at the base model (MERIT)."""

    calibration_samples: int = Field(200, ge=1, description="Examples drawn per source (n).")
    stride: int = Field(5, ge=1, description="Take every stride-th example before drawing (s).")
    projection_dim: int = Field(8192, ge=16, description="Dimension of the shared JL sketch.")
    parameters: str = Field(
        "attention", description="Parameter filter: attention, all, or a regex over names."
    )
    centered: bool = Field(True, description="Double-centre the conflict matrix before PCA.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per backward pass.")
    seed: int = Field(0, description="Seed of calibration sampling and of the projection.")


class PartitioningSpec(ApiModel):
    """How sources are grouped into partitions."""

    strategy: PartitionStrategy = Field("conflictPCA", description="Split strategy.")
    axes: int = Field(2, ge=0, le=6, description="PCA axes r; conflictPCA gives K = 2^axes.")
    partitions: int | None = Field(
        None, ge=1, description="K for random/bySite (default 2^axes)."
    )
    assignments: list[list[str]] | None = Field(
        None, description="manual: the sources of each partition."
    )
    seed: int = Field(0, description="Seed of random splits and tie-breaking.")

    @model_validator(mode="after")
    def _manual_needs_assignments(self) -> PartitioningSpec:
        if self.strategy == "manual" and not self.assignments:
            raise ValueError("strategy manual needs partitioning.assignments")
        return self

    def partition_count(self) -> int:
        if self.strategy == "manual":
            return len(self.assignments or [])
        return self.partitions or 2**self.axes


class LoraSpec(ApiModel):
    """LoRA settings when training.method is lora."""

    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    target_modules: list[str] | None = Field(None, description="Module names to adapt.")


class TrainingSpec(ApiModel):
    """How each partition is trained from the base model (no communication between them)."""

    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA.")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the partition's examples.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step.")
    max_seq_len: int = Field(512, ge=8, description="Tokens per example after truncation.")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Linear warm-up share of steps.")
    second_moments: Literal["none", "rank1", "full"] = Field(
        "rank1", description="Save Adam exp_avg_sq for OTA: rank-1 factors, full, or none."
    )
    seed: int = Field(0, description="Base seed; partition k trains with seed + k.")
    lora: LoraSpec | None = Field(None, description="LoRA settings (method lora).")


class JobTemplate(ApiModel):
    """What every stage Job's pod gets."""

    image: str | None = Field(None, description="Trainer image (merge uses mergeImage).")
    merge_image: str | None = Field(None, description="Merger image.")
    resources: dict[str, Any] | None = Field(
        None, description="Container resources, e.g. limits nvidia.com/gpu."
    )
    node_selector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(None, description="Pod tolerations.")
    service_account_name: str | None = Field(None, description="Pod service account.")
    env: list[dict[str, Any]] | None = Field(None, description="Extra container env entries.")
    queue_name: str | None = Field(None, description="Kueue LocalQueue (adds the queue label).")
    ttl_seconds_after_finished: int | None = Field(
        3600, ge=0, description="Delete finished Jobs after this many seconds."
    )


class SiteSpec(ApiModel):
    """A place outside this cluster that trains partitions."""

    name: str = Field(min_length=1, description="Site name, as used by sources[].site.")
    mode: SiteMode = Field("pull", description="pull: the site fetches and pushes; kubeconfig.")
    secret_ref: SecretRef | None = Field(None, description="kubeconfig Secret (kubeconfig mode).")
    deadline_seconds: int | None = Field(None, ge=1, description="Wait this long for the site.")
    public_key: str | None = Field(None, description="ed25519 public key (base64) for manifests.")
    sketches: bool = Field(
        False, description="pull: ask the site for gradient sketches of its sources before "
                           "profiling, so the split is conflict-aware without seeing its data.")


class OtaSpec(ApiModel):
    """Curvature-aware OTA merge parameters."""

    power: float = Field(0.5, gt=0, description="Exponent p on the second moments.")
    epsilon: float = Field(1e-26, ge=0, description="Added to v^p; must stay tiny.")
    density: float | None = Field(
        None, gt=0, le=1, description="FFG: keep this fraction of elements per expert."
    )


class MergeSpec(ApiModel):
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
    shard_size_mb: int = Field(2000, ge=1, description="Output shard size in MB.")


class MixtureSearchSpec(ApiModel):
    """Rank candidate mixtures by merging the partitions (merge-as-proxy)."""

    enabled: bool = Field(False, description="Run the search after training.")
    grid: int = Field(8, ge=2, description="Simplex lattice denominator.")
    dirichlet: int | None = Field(None, ge=1, description="Use N Dirichlet draws instead.")
    seed: int = Field(0, ge=0, description="Seed of the Dirichlet draws.")
    objective: Literal["mean-loss", "mean-accuracy", "weighted"] = Field(
        "mean-loss", description="What ranks the candidates."
    )


class MeritRunSpec(ApiModel):
    """A MeritRun: split, train in isolation, merge once."""

    base_model: ModelRef = Field(description="The merge-ready base checkpoint theta0.")
    data: DataSpec = Field(description="The instruction-tuning mixture.")
    storage: StorageSpec | None = Field(None, description="Artifact storage (local default).")
    profiling: ProfilingSpec = Field(default_factory=ProfilingSpec, description="Profiling.")
    partitioning: PartitioningSpec = Field(
        default_factory=PartitioningSpec, description="Partitioning."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training.")
    template: JobTemplate = Field(default_factory=JobTemplate, description="Job pod template.")
    sites: list[SiteSpec] | None = Field(None, description="Other sites that train partitions.")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="Merge.")
    mixture_search: MixtureSearchSpec = Field(
        default_factory=MixtureSearchSpec, description="Mixture search by merging."
    )
    backoff_limit: int = Field(2, ge=0, description="Retries per Job before it counts as failed.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail after this long.")
    suspend: bool = Field(False, description="Create no new Jobs while true.")
    delete_artifacts: bool = Field(False, description="Delete artifacts with the run.")

    @model_validator(mode="after")
    def _consistent(self) -> MeritRunSpec:
        if self.mixture_search.enabled and not self.data.held_out_uri:
            raise ValueError("mixtureSearch.enabled needs data.heldOutUri to score mixtures")
        if self.merge.method == "ota" and self.training.method == "lora":
            raise ValueError("merge.method ota needs full fine-tuning: LoRA partitions carry "
                             "no second moments of the merged weights")
        if self.merge.method == "ota" and self.training.second_moments == "none":
            raise ValueError("merge.method ota needs training.secondMoments rank1 or full")
        sites = {s.name: s for s in self.sites or []}
        for i, src in enumerate(self.data.sources or []):
            if src.site and src.site not in sites:
                raise ValueError(f"data.sources[{i}].site {src.site!r} is not in spec.sites")
            site = sites.get(src.site or "")
            if self.partitioning.strategy != "conflictPCA" or site is None:
                continue
            if site.mode == "pull":
                raise ValueError(f"data.sources[{i}] ({src.name}) stays at pull site "
                                 f"{site.name!r}: conflictPCA could put it in a partition with "
                                 "other sites' sources; use strategy bySite (with "
                                 "sites[].sketches: true the split within each site follows "
                                 "the conflicts)")
            if src.uri is None:
                raise ValueError(f"data.sources[{i}] ({src.name}) has no uri: conflictPCA "
                                 "needs its gradients at the hub; use strategy bySite")
        for i, site in enumerate(self.sites or []):
            if site.sketches and site.mode != "pull":
                raise ValueError(f"sites[{i}].sketches: only pull sites upload sketches")
            if site.sketches and not any(src.site == site.name
                                         for src in self.data.sources or []):
                raise ValueError(f"sites[{i}].sketches: no source in data.sources lives at "
                                 f"site {site.name!r}")
            if site.public_key and site.mode != "pull":
                raise ValueError(f"sites[{i}].publicKey: only pull sites sign their manifests "
                                 "(a kubeconfig site runs the hub's own trainer Jobs)")
        return self
