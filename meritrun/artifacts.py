"""The artifact contract: what every trainer writes and the merger reads, and where.

A partition artifact is a directory with a Hugging Face model directory (full safetensors
weights, or a peft LoRA adapter), an optional `optimizer_v.safetensors` (Adam second moments,
full or rank-1 factors) and `manifest.json`. The manifest lists the sha256 and size of every
other file, so a contribution from a machine we do not control can be checked before use.
In storage the run's uid and the attempt number are part of every key: a re-created run of
the same name, or another attempt, never reads or overwrites what another one wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "manifest.json"
OPTIMIZER_V_NAME = "optimizer_v.safetensors"
VERDICT_NAME = "verdict.json"
# Written beside the artifact by the trainer while it trains (step, loss) for the status
# display; not part of the artifact: never listed in the manifest, never opened by a merge.
PROGRESS_NAME = "progress.json"
SIDE_FILES = frozenset({MANIFEST_NAME, PROGRESS_NAME})
FORMAT_VERSION = "meritrun.partition/v1"
TOKEN_DEFINITION = "supervised = response/assistant tokens after truncation, summed over epochs"
_CHUNK = 8 << 20


def check_relative_path(value: str) -> str:
    """`value` as a path inside an artifact: relative, POSIX, normalized, no `..`.

    A manifest comes from a machine the hub does not control: a path naming anything outside
    the artifact (absolute, `..`, a drive, a backslash) or written two ways (`a//b`, `./a`,
    `a/`) could make the verify stage or the merge read a file the manifest does not vouch
    for. Normalized form means one spelling per file, so "is it listed?" is a string lookup.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("path must be a non-empty string")
    if "\\" in value or "\0" in value or value.startswith("/"):
        raise ValueError(f"path {value!r} must be relative POSIX (no '/' prefix, '\\', NUL)")
    bad = [part for part in value.split("/") if part in ("", ".", "..")]
    if bad:
        raise ValueError(f"path {value!r} must be normalized, without '', '.' or '..' parts")
    return value


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TokenCounts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    supervised: int = Field(ge=0, description="Response/assistant tokens trained on.")
    total: int = Field(ge=0, description="All tokens fed to the model.")
    definition: str = TOKEN_DEFINITION


class SecondMoments(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = OPTIMIZER_V_NAME
    kind: Literal["rank1", "full"]
    beta2: float
    step: int = Field(ge=0)
    bias_corrected: bool = False

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        return check_relative_path(value)


class PartitionManifest(BaseModel):
    """manifest.json of a partition artifact (format meritrun.partition/v1)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    format: str = FORMAT_VERSION
    run: str
    run_uid: str | None = Field(None, description="The run's uid (RunId.uid): a reader "
                                "refuses a manifest of another run.")
    partition: str
    attempt: int = Field(ge=1)
    site: str | None = None
    sources: list[str]
    tokens: TokenCounts
    base: str = Field(description="Fingerprint of the base weights (base_fingerprint).")
    weights: Literal["full", "lora"] = "full"
    model_dir: str = Field("model", description="Subdirectory holding the HF model/adapter.")
    training: dict = Field(default_factory=dict, description="Hyperparameters used.")
    second_moments: SecondMoments | None = None
    files: dict[str, FileEntry] = Field(description="Every other file: relative path -> hash.")
    signature: str | None = Field(None, description="Optional ed25519 signature (base64).")

    @field_validator("model_dir")
    @classmethod
    def _model_dir_inside(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("files")
    @classmethod
    def _files_inside(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in value:
            check_relative_path(rel)
        return value

    def listed_under(self, directory: str) -> list[str]:
        """The listed files inside `directory` (relative to the artifact), sorted."""
        return sorted(rel for rel in self.files if rel.startswith(directory + "/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(
    root: Path, *, exclude: frozenset[str] = frozenset({MANIFEST_NAME})
) -> dict[str, FileEntry]:
    """sha256 and size of every file under root, keyed by POSIX relative path."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            entries[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    return entries


def base_fingerprint(model_dir: Path) -> str:
    """Fingerprint of a model's weights: sha256 over (name, sha256) of its safetensors files.

    Independent of config/tokenizer files, so the same weights give the same fingerprint on
    any machine. Sharding changes it (a resharded base is a different upload to check).
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    return fingerprint_of({f.name: sha256_file(f) for f in files})


def fingerprint_of(hashes: Mapping[str, str]) -> str:
    """The fingerprint of weights given each safetensors file's name and sha256 (so a reader
    that hashed the files another way, e.g. streaming them from storage, gets the same)."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}:{hashes[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def write_manifest(artifact_dir: Path, manifest: PartitionManifest) -> Path:
    path = artifact_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=2))
    return path


def read_manifest(artifact_dir: Path) -> PartitionManifest:
    return PartitionManifest.model_validate_json((artifact_dir / MANIFEST_NAME).read_text())


# --- storage layout: every key carries the run's uid and the attempt number -------------

_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class RunId:
    """Which run: its name (for people and Job names) and its uid (for its results).

    The uid is the custom resource's `metadata.uid` (with a reset suffix after an invalid
    spec was fixed) or, on the local runner, an id made once per workdir run. It is one key
    segment, so delete-and-re-create of a run with the same name never sees the old results.
    """

    name: str
    uid: str

    def __post_init__(self) -> None:
        if not _UID.match(self.uid):
            raise ValueError(f"run uid {self.uid!r} is not one safe storage key segment")

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


def run_prefix(run: RunId) -> str:
    return f"runs/{run.name}/{run.uid}"


def plan_prefix(run: RunId, attempt: int) -> str:
    return f"{run_prefix(run)}/plan/attempt-{attempt}"


def partition_prefix(run: RunId, partition: str, attempt: int) -> str:
    return f"{run_prefix(run)}/partitions/{partition}/attempt-{attempt}"


def checkpoint_prefix(run: RunId, partition: str) -> str:
    """A partition's training checkpoints: no attempt in the key, since the next attempt of
    the same partition resumes from them (the trainer fences by a configuration hash below)."""
    return f"{run_prefix(run)}/partitions/{partition}/checkpoints"


def merged_prefix(run: RunId, attempt: int) -> str:
    return f"{run_prefix(run)}/merged/attempt-{attempt}"


def search_prefix(run: RunId, attempt: int) -> str:
    return f"{run_prefix(run)}/search/attempt-{attempt}"


def verdict_prefix(run: RunId, partition: str, attempt: int) -> str:
    """The hub's verdict on a contribution: outside the prefix the contributing site may
    write, so a site can never forge its own acceptance."""
    return f"{run_prefix(run)}/verdicts/{partition}/attempt-{attempt}"


def names_run(document: dict | None, run: RunId) -> bool:
    """Whether a stage's JSON output (plan, report, verdict, search) is this run's.

    A document without `run_uid`, or with another one, is not: the reader treats it as
    absent (it was left by another run of the same name, or forged).
    """
    return document is not None and document.get("run_uid") == run.uid
