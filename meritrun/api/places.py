"""Where a run's inputs and outputs live and who trains: the base model, the data sources, the
artifact storage and the other sites. Names here become storage keys, label values and parts of
object names, hence their patterns."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from . import limits as lim
from ._base import SpecModel
from .fields import DNS_LABEL, MAP_BY_NAME, SOURCE_NAME, cel

SiteMode = Literal["pull", "kubeconfig"]


class SecretRef(SpecModel):
    """A Secret in the run's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")


class ModelRef(SpecModel):
    """A Hugging Face model directory (config, safetensors weights, tokenizer)."""

    uri: str = Field(
        min_length=1, max_length=lim.URI_LEN,
        description="Where the model directory lives: s3://bucket/prefix, file:///path or a path.",
    )


class SourceSpec(SpecModel):
    """One data source stored on its own, possibly at another site."""

    name: str = Field(min_length=1, max_length=lim.SOURCE_NAME_LEN, pattern=SOURCE_NAME,
                      description="Source name, as in the examples' source field (letters, "
                                  "digits, '.', '_', '-'; unique).")
    uri: str | None = Field(None, max_length=lim.URI_LEN,
                            description="JSONL file of this source; omit at pull sites.")
    site: str | None = Field(None, max_length=lim.NAME_LEN,
                             description="Site that holds this source's data (a sites[].name).")


class DataSpec(SpecModel):
    """The instruction-tuning mixture: JSON Lines with a source field."""

    model_config = cel(("has(self.uri) || (has(self.sources) && size(self.sources) > 0)",
                         "set either data.uri or data.sources"))

    uri: str | None = Field(None, max_length=lim.URI_LEN,
                            description="One JSONL file holding every source.")
    source_field: str = Field("source", min_length=1, max_length=253,
                              description="Field of each example naming its source.")
    sources: list[SourceSpec] | None = Field(
        None, max_length=lim.MAX_SOURCES, json_schema_extra=MAP_BY_NAME,
        description="Sources stored separately (alternative to uri); names are unique.",
    )
    held_out_uri: str | None = Field(None, max_length=lim.URI_LEN,
                                     description="Held-out JSONL for evaluation reports.")

    @model_validator(mode="after")
    def _one_location(self) -> DataSpec:
        if self.uri is None and not self.sources:
            raise ValueError("set either data.uri or data.sources")
        names = [s.name for s in self.sources or []]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"sources[{i}].name {name!r} repeats sources"
                                 f"[{names.index(name)}]: each source is counted once")
        return self


class StorageSpec(SpecModel):
    """Object storage shared by every stage: S3-compatible (MinIO) or a local directory."""

    uri: str | None = Field(
        None, max_length=lim.URI_LEN,
        description="Root of the run's artifacts: s3://bucket/prefix or file:///path.",
    )
    endpoint: str | None = Field(None, max_length=lim.URI_LEN,
                                 description="S3 endpoint URL, e.g. http://minio:9000.")
    bucket: str | None = Field(None, min_length=3, max_length=63,
                               description="Bucket (when uri is not given).")
    region: str | None = Field(None, max_length=64,
                               description="S3 region, if the server needs one.")
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


class SiteSpec(SpecModel):
    """A place outside this cluster that trains partitions."""

    model_config = cel(
        ("!has(self.sketches) || !self.sketches || !has(self.mode) || self.mode == 'pull'",
         "sketches: only pull sites upload sketches"),
        ("!has(self.publicKey) || !has(self.mode) || self.mode == 'pull'",
         "publicKey: only pull sites sign their manifests"),
    )

    name: str = Field(min_length=1, max_length=lim.NAME_LEN, pattern=DNS_LABEL,
                      description="Site name, as used by sources[].site: a DNS label "
                                  "(lower-case letters, digits, '-'; unique).")
    mode: SiteMode = Field("pull", description="pull: the site fetches and pushes; kubeconfig.")
    secret_ref: SecretRef | None = Field(None, description="kubeconfig Secret (kubeconfig mode).")
    deadline_seconds: int | None = Field(None, ge=1, le=lim.MAX_DEADLINE_S,
                                         description="Wait this long for the site.")
    public_key: str | None = Field(None, max_length=256,
                                   description="ed25519 public key (base64) for manifests.")
    sketches: bool = Field(
        False, description="pull: ask the site for gradient sketches of its sources before "
                           "profiling, so the split is conflict-aware without seeing its data.")
