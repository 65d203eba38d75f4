"""Pure builders of stage Jobs: deterministic names and the parameters each stage gets.

Both backends run exactly what these return, so a Kubernetes Job and a local process of the
same stage and attempt get identical parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import artifacts
from .api import MeritRunSpec, PartitionStatus
from .stages import (
    MergeParams,
    PartitionInput,
    ProfileParams,
    SearchParams,
    StorageParams,
    TrainParams,
)

Stage = Literal["profile", "train", "merge", "search"]
StageParams = ProfileParams | TrainParams | MergeParams | SearchParams


@dataclass(frozen=True)
class CreateJob:
    """Start one attempt of a stage (idempotent: same name, same attempt)."""

    stage: Stage
    name: str
    attempt: int
    params: StageParams
    partition: str | None = None
    cluster: str | None = None  # a kubeconfig site, or None for this cluster


def job_name(run: str, stage: str, attempt: int, partition: str | None = None) -> str:
    middle = partition if stage == "train" else stage
    return f"{run}-{middle}-a{attempt}"


def storage_params(spec: MeritRunSpec) -> StorageParams:
    if spec.storage is None:
        raise ValueError("spec.storage must be resolved before building jobs")
    return StorageParams(uri=spec.storage.root_uri(), endpoint=spec.storage.endpoint,
                         region=spec.storage.region)


def source_sites(spec: MeritRunSpec) -> dict[str, str]:
    return {s.name: s.site for s in spec.data.sources or [] if s.site}


def profile_job(run: str, spec: MeritRunSpec, attempt: int) -> CreateJob:
    params = ProfileParams(
        run=run, attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri, output=artifacts.plan_prefix(run, attempt),
        data=spec.data, profiling=spec.profiling, partitioning=spec.partitioning,
        sites=source_sites(spec), max_seq_len=spec.training.max_seq_len,
    )
    return CreateJob("profile", job_name(run, "profile", attempt), attempt, params)


def train_job(run: str, spec: MeritRunSpec, part: PartitionStatus, attempt: int,
              *, cluster: str | None = None) -> CreateJob:
    params = TrainParams(
        run=run, attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri,
        output=artifacts.partition_prefix(run, part.name, attempt),
        partition=part.name, index=part.index, sources=part.sources, site=part.site,
        data=spec.data, training=spec.training,
    )
    return CreateJob("train", job_name(run, "train", attempt, part.name), attempt, params,
                     partition=part.name, cluster=cluster)


def partition_inputs(run: str, parts: list[PartitionStatus]) -> list[PartitionInput]:
    return [PartitionInput(name=p.name, prefix=artifacts.partition_prefix(run, p.name, p.attempt))
            for p in parts]


def merge_job(run: str, spec: MeritRunSpec, included: list[PartitionStatus],
              attempt: int) -> CreateJob:
    params = MergeParams(
        run=run, attempt=attempt, storage=storage_params(spec), base_model=spec.base_model.uri,
        output=artifacts.merged_prefix(run, attempt), partitions=partition_inputs(run, included),
        merge=spec.merge, held_out=spec.data.held_out_uri,
    )
    return CreateJob("merge", job_name(run, "merge", attempt), attempt, params)


def search_job(run: str, spec: MeritRunSpec, included: list[PartitionStatus],
               attempt: int) -> CreateJob:
    if spec.data.held_out_uri is None:
        raise ValueError("mixture search needs data.heldOutUri")
    params = SearchParams(
        run=run, attempt=attempt, storage=storage_params(spec), base_model=spec.base_model.uri,
        output=artifacts.search_prefix(run, attempt), partitions=partition_inputs(run, included),
        search=spec.mixture_search, held_out=spec.data.held_out_uri,
    )
    return CreateJob("search", job_name(run, "search", attempt), attempt, params)
