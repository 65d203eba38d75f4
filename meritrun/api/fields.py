"""Field building blocks shared by the spec's models: patterns, bounds-carrying types, and the
CRD extras (CEL rules, list maps, section defaults) that meritrun.crd copies into the schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from . import limits as lim
from ._base import SpecModel

SourceName = Annotated[str, Field(min_length=1, max_length=lim.SOURCE_NAME_LEN)]
Assignment = Annotated[list[SourceName], Field(min_length=1, max_length=lim.MAX_SOURCES)]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SOURCE_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
SECTION = {"default": {}}  # the API server then fills the section's own defaults
# Named lists are maps keyed by name: the API server refuses duplicates and merges by name.
MAP_BY_NAME = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


def cel(*rules: tuple[str, str]) -> ConfigDict:
    """A model config carrying CEL rules (rule, message) for the CRD."""
    return ConfigDict(**SpecModel.model_config, json_schema_extra={
        "x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]})


def section(model: type) -> Any:
    """A spec section that is always there (defaults): `default: {}` in the CRD too, so the API
    server fills the section's own defaults; described by its model's docstring."""
    return Field(default_factory=model, json_schema_extra=SECTION,
                 description=" ".join((model.__doc__ or "").split()))


def seed_field(what: str) -> Any:
    """A seed: any int64 from 0 (Kubernetes integers are int64)."""
    return Field(0, ge=0, le=lim.SEED_MAX, description=f"{what} (0 to 2^63-1).")
