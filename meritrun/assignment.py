"""What a pull-mode site receives: its assignment (what to train or sketch, from what, where
to) and the grant bundle that says where the assignment is and holds a scoped key; plus the
check that a site's local data matches the sources its assignment declares.

A pull site never receives a Job: it runs `meritrun contribute` itself. The hub writes one
assignment per (site, partition, attempt) next to the run's artifacts; it holds no credential
(those travel in the grant, which meritrun.access issues) and no data (the site has its own).
Building an assignment is pure and deterministic (same spec and status, same bytes), so the
operator can write it again on every reconcile without changing anything.

Layout, with the run's uid and the attempt in every key like the rest of the run:
    runs/<run>/<uid>/sites/<site>/<partition>/attempt-<n>/assignment.json   a training one
    runs/<run>/<uid>/sites/<site>/sketch/attempt-<n>/assignment.json        a sketch-only one
    runs/<run>/<uid>/sketches/<site>/attempt-<n>/sketch.npy, sketch.json    a site's sketches
A training assignment's output is the usual partition prefix (meritrun.artifacts).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .api import (
    DataSpec,
    MeritRunSpec,
    PartitionStatus,
    ProfilingSpec,
    SiteSpec,
    TrainingSpec,
)
from .artifacts import RunId, partition_prefix, run_prefix, sha256_file
from .conditions import from_rfc3339, to_rfc3339
from .data import iter_examples
from .errors import DataError, SpecError
from .stages import StorageParams, TrainParams, run_fields, storage_params

log = logging.getLogger(__name__)

ASSIGNMENT_NAME = "assignment.json"
ASSIGNMENT_FORMAT: Final = "meritrun.assignment/v1"
SKETCH = "sketch"
GRANT_FORMAT: Final = "meritrun.site-grant/v1"


def site_prefix(run: RunId, site: str) -> str:
    return f"{run_prefix(run)}/sites/{site}"


def assignment_prefix(run: RunId, site: str, name: str, attempt: int) -> str:
    """name: the partition, or "sketch" for a sketch-only assignment (partitions are p<k>)."""
    return f"{site_prefix(run, site)}/{name}/attempt-{attempt}"


def sketch_output_prefix(run: RunId, site: str, attempt: int) -> str:
    return f"{run_prefix(run)}/sketches/{site}/attempt-{attempt}"


class Assignment(BaseModel):
    """assignment.json: one site's part of a run, as the hub decided it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["meritrun.assignment/v1"] = ASSIGNMENT_FORMAT
    kind: Literal["train", "sketch"] = Field(description="Train a partition, or only sketch.")
    run: str
    run_uid: str = Field(description="The run's uid: its manifest must carry it.")
    site: str
    attempt: int = Field(ge=1, description="Attempt of the partition (or of the profile).")
    partition: str | None = Field(None, description="Partition to train (kind train).")
    index: int | None = Field(None, ge=0, description="Partition index: seed = seed + index.")
    sources: list[str] = Field(min_length=1, description="Sources the site must supply.")
    source_field: str = "source"
    base_model: str = Field(description="URI of the base model directory (theta0).")
    training: TrainingSpec
    profiling: ProfilingSpec = Field(description="Sketch settings, incl. the profiling seed.")
    output: str = Field(description="Key prefix (under the run's storage root) to write.")
    storage: StorageParams = Field(description="The run's storage as the hub sees it.")
    deadline: str | None = Field(None, description="RFC 3339: the hub stops waiting then.")
    public_key: str | None = Field(None, description="Registered key: manifests must be "
                                   "signed with its private half.")

    @property
    def name(self) -> str:
        return self.partition if self.kind == "train" and self.partition else SKETCH

    @property
    def run_id(self) -> RunId:
        return RunId(self.run, self.run_uid)

    @property
    def key(self) -> str:
        """Where this assignment is stored, relative to the run's storage root."""
        prefix = assignment_prefix(self.run_id, self.site, self.name, self.attempt)
        return f"{prefix}/{ASSIGNMENT_NAME}"

    def train_params(self, *, data_uri: str, base_model: str, storage: StorageParams,
                     output: str) -> TrainParams:
        """Stage parameters that train exactly this partition from a site's local inputs."""
        if self.kind != "train" or self.partition is None or self.index is None:
            raise SpecError("a sketch assignment trains nothing", path="assignment.kind")
        return TrainParams(
            **run_fields(self.run_id), attempt=self.attempt, storage=storage,
            base_model=base_model,
            output=output, partition=self.partition, index=self.index,
            sources=list(self.sources), site=self.site, training=self.training,
            data=DataSpec(uri=data_uri, source_field=self.source_field, sources=None,
                          held_out_uri=None),
        )


def find_site(spec: MeritRunSpec, site: str | None) -> SiteSpec:
    """Kept for callers outside the core; `spec.site(name)` is the one lookup."""
    return spec.site(site)


def _common(run: RunId, spec: MeritRunSpec, site: SiteSpec) -> dict:
    return {**run_fields(run), "site": site.name, "source_field": spec.data.source_field,
            "base_model": spec.base_model.uri, "training": spec.training,
            "profiling": spec.profiling, "storage": storage_params(spec),
            "public_key": site.public_key}


def build_train_assignment(run: RunId, spec: MeritRunSpec, part: PartitionStatus) -> Assignment:
    """The assignment of a pull-site partition, for the attempt the status holds."""
    site = spec.site(part.site)
    if site.mode != "pull":
        raise SpecError(f"site {site.name!r} is a {site.mode} site: it gets Jobs, not "
                        "assignments", path="spec.sites")
    deadline = None
    if site.deadline_seconds and part.start_time:
        start = from_rfc3339(part.start_time)
        deadline = to_rfc3339(start + timedelta(seconds=site.deadline_seconds))
    attempt = max(part.attempt, 1)
    return Assignment(kind="train", attempt=attempt, partition=part.name, index=part.index,
                      sources=list(part.sources), deadline=deadline,
                      output=partition_prefix(run, part.name, attempt),
                      **_common(run, spec, site))


def build_sketch_assignment(run: RunId, spec: MeritRunSpec, site_name: str, *, attempt: int,
                            deadline: datetime | None = None) -> Assignment:
    """Ask a site for gradient sketches of its own sources (profiling without its data)."""
    site = spec.site(site_name)
    sources = [s.name for s in spec.data.sources or [] if s.site == site.name]
    if not sources:
        raise SpecError(f"no source in data.sources lives at site {site.name!r}",
                        path="spec.data.sources")
    return Assignment(kind="sketch", attempt=attempt, sources=sources,
                      deadline=to_rfc3339(deadline) if deadline else None,
                      output=sketch_output_prefix(run, site.name, attempt),
                      **_common(run, spec, site))


def assignment_bytes(assignment: Assignment) -> bytes:
    return json.dumps(assignment.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def first_error(e: ValidationError) -> str:
    """"field: message" of a validation error's first problem (never the offending value)."""
    first = e.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or '(root)'}: {first['msg']}"


def parse_assignment(data: bytes | str, *, where: str = "assignment") -> Assignment:
    try:
        return Assignment.model_validate_json(data)
    except ValidationError as e:
        raise SpecError(f"{where}: {first_error(e)}", path="--assignment") from e


def write_assignment(storage, assignment: Assignment) -> str:
    """Store the assignment (idempotent: the same inputs write the same bytes); its key."""
    storage.put_bytes(assignment.key, assignment_bytes(assignment))
    return assignment.key


def read_assignment(storage, key: str) -> Assignment:
    return parse_assignment(storage.get_bytes(key), where=storage.uri_for(key))


# --- the site's side: does its data match the assignment ----------------------------------


@dataclass(frozen=True)
class SiteData:
    path: Path
    counts: dict[str, int]  # declared source -> examples
    ignored: dict[str, int]  # sources in the file the assignment does not name -> examples
    sha256: str


def check_site_data(path: Path, declared: list[str], *, source_field: str) -> SiteData:
    """Count examples per source; a declared source without any is an error naming it."""
    counts = Counter(ex.source for ex in iter_examples(path, source_field=source_field))
    missing = [s for s in declared if not counts[s]]
    if missing:
        raise DataError(f"{path} has no examples for declared source(s) "
                        f"{', '.join(map(repr, missing))} (field {source_field!r}); this "
                        f"assignment trains on {', '.join(declared)}. Nothing was trained or "
                        "uploaded")
    ignored = {s: n for s, n in counts.items() if s not in declared}
    if ignored:
        log.warning("%s: NOT training on undeclared source(s) %s; they are listed in the "
                    "manifest's site_data.ignored", path,
                    ", ".join(f"{s} ({n} examples)" for s, n in ignored.items()))
    return SiteData(path, {s: counts[s] for s in declared}, ignored, sha256_file(path))


# --- the grant: how a site reaches its assignment (meritrun.access issues it) --------------


class SiteCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    access_key_id: str
    secret_access_key: SecretStr


class SiteGrant(BaseModel):
    """What a site needs to contribute: where its assignment is, and (for S3) a scoped key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["meritrun.site-grant/v1"] = GRANT_FORMAT
    run: str
    run_uid: str
    site: str
    name: str  # the partition, or "sketch"
    attempt: int
    storage_root: str  # the run's storage root (s3://bucket[/prefix] or file:///path)
    assignment_key: str  # relative to storage_root
    endpoint: str | None = None  # as the site reaches it (may differ from the hub's)
    region: str | None = None
    identity: str | None = None  # storage identity to revoke; not a secret
    expires: str | None = None  # RFC 3339
    credentials: SiteCredentials | None = None

    def public_view(self) -> dict:
        """Everything but the credentials: safe for status, events and logs."""
        return self.model_dump(mode="json", exclude={"credentials"}, exclude_none=True)

    def bundle_json(self) -> str:
        """The grant WITH its secret key: for a Kubernetes Secret or the site, nowhere else."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.credentials is not None:
            secret = self.credentials.secret_access_key.get_secret_value()
            data["credentials"]["secret_access_key"] = secret
        return json.dumps(data, indent=2)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= from_rfc3339(self.expires)


def parse_grant(text: str | bytes) -> SiteGrant:
    try:
        return SiteGrant.model_validate_json(text)
    except ValidationError as e:  # first_error names fields, never values: no secret leaks
        raise SpecError(f"not a site grant: {first_error(e)}", path="--assignment") from e
