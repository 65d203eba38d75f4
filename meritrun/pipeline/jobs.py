"""Pure builders of stage Jobs: deterministic names and the parameters each stage gets.

Both backends run exactly what these return, so a Kubernetes Job and a local process of the
same stage and attempt get identical parameters.
"""

from __future__ import annotations

from .. import artifacts
from ..api import MeritRunSpec, PartitionStatus
from ..artifacts import RunId
from ..stages import (
    MergeParams,
    PartitionInput,
    ProfileParams,
    SearchParams,
    TrainParams,
    VerifyParams,
    run_fields,
    storage_params,
)
from . import quorum
from .actions import CreateJob, Stage

__all__ = ["CreateJob", "Stage", "job_name", "merge_job", "partition_input", "partition_inputs",
           "profile_job", "run_fields", "search_job", "source_sites", "storage_params", "train_job",
           "verify_job"]


def job_name(run: str, stage: str, attempt: int, partition: str | None = None) -> str:
    middle = {"train": partition, "verify": f"{partition}-verify"}.get(stage, stage)
    return f"{run}-{middle}-a{attempt}"


def source_sites(spec: MeritRunSpec) -> dict[str, str]:
    return {s.name: s.site for s in spec.data.sources or [] if s.site}


def profile_job(run: RunId, spec: MeritRunSpec, attempt: int, *,
                site_sketches: dict[str, str] | None = None) -> CreateJob:
    params = ProfileParams(
        **run_fields(run), attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri, output=artifacts.plan_prefix(run, attempt),
        data=spec.data, profiling=spec.profiling, partitioning=spec.partitioning,
        sites=source_sites(spec), max_seq_len=spec.training.max_seq_len,
        site_sketches=dict(site_sketches or {}),
    )
    return CreateJob("profile", job_name(run.name, "profile", attempt), attempt, params)


def train_job(run: RunId, spec: MeritRunSpec, part: PartitionStatus, attempt: int,
              *, cluster: str | None = None) -> CreateJob:
    params = TrainParams(
        **run_fields(run), attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri,
        output=artifacts.partition_prefix(run, part.name, attempt),
        partition=part.name, index=part.index, sources=part.sources, site=part.site,
        data=spec.data, training=spec.training,
        # A workVolume PVC outlives the attempt; an emptyDir does not, so storage keeps them.
        checkpoints=None if spec.template.work_volume else artifacts.checkpoint_prefix(
            run, part.name),
    )
    return CreateJob("train", job_name(run.name, "train", attempt, part.name), attempt, params,
                     partition=part.name, cluster=cluster)


def partition_input(run: RunId, spec: MeritRunSpec, part: PartitionStatus) -> PartitionInput:
    """Where a partition's artifact is, who must have made (and signed) it, and what the plan
    lets it claim (its sources, their tokens, the epochs)."""
    return PartitionInput(name=part.name,
                          prefix=artifacts.partition_prefix(run, part.name, part.attempt),
                          attempt=part.attempt or None, run_uid=run.uid, site=part.site,
                          public_key=spec.site(part.site).public_key if part.site else None,
                          sources=list(part.sources), source_tokens=planned_tokens(part),
                          epochs=spec.training.epochs)


def planned_tokens(part: PartitionStatus) -> int | None:
    """The plan's token count of a partition's sources, None when the hub could not count
    them (a pull site's data, without sketches, counts 0 in the plan: no bound, not 0)."""
    return part.planned_tokens or None


def partition_inputs(run: RunId, spec: MeritRunSpec,
                     parts: list[PartitionStatus]) -> list[PartitionInput]:
    return [partition_input(run, spec, p) for p in parts]


def verify_job(run: RunId, spec: MeritRunSpec, part: PartitionStatus, attempt: int) -> CreateJob:
    """Check a pull site's contribution (attempt = the partition's attempt) as it arrives."""
    params = VerifyParams(
        **run_fields(run), attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri,
        output=artifacts.verdict_prefix(run, part.name, attempt),
        partition=partition_input(run, spec, part), merge=spec.merge,
    )
    return CreateJob("verify", job_name(run.name, "verify", attempt, part.name), attempt, params,
                     partition=part.name)


def merge_job(run: RunId, spec: MeritRunSpec, included: list[PartitionStatus], attempt: int,
              *, planned: int | None = None) -> CreateJob:
    """Merge `included`; the quorum is counted over the plan's `planned` partitions."""
    planned = planned or len(included)
    params = MergeParams(
        planned=planned, required=quorum.required(planned, spec.merge.quorum),
        **run_fields(run), attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri,
        output=artifacts.merged_prefix(run, attempt),
        partitions=partition_inputs(run, spec, included),
        merge=spec.merge, held_out=spec.data.held_out_uri,
    )
    return CreateJob("merge", job_name(run.name, "merge", attempt), attempt, params)


def search_job(run: RunId, spec: MeritRunSpec, included: list[PartitionStatus],
               attempt: int) -> CreateJob:
    if spec.data.held_out_uri is None:
        raise ValueError("mixture search needs data.heldOutUri")
    params = SearchParams(
        **run_fields(run), attempt=attempt, storage=storage_params(spec),
        base_model=spec.base_model.uri,
        output=artifacts.search_prefix(run, attempt),
        partitions=partition_inputs(run, spec, included),
        search=spec.mixture_search, held_out=spec.data.held_out_uri,
    )
    return CreateJob("search", job_name(run.name, "search", attempt), attempt, params)
