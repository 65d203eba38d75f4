"""Shared pydantic configuration for the MeritRun API models (camelCase on the wire).

`SpecModel` adds what a user-written spec needs beyond the status: non-finite numbers
(`.inf`, `.nan` in YAML) are refused where they are written, since no MeritRun parameter means
anything at infinity and an infinite epsilon would otherwise fail only at the merge, after all
training. The wire edges (meritrun.validation) validate by alias only, so `learning_rate` is an
unknown field there as it is for the CRD; Python code may still pass snake_case names.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

INT64_MAX = 2**63 - 1  # Kubernetes integers are int64; seeds and counts stay below this


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict:
        """The object as Kubernetes stores it: camelCase, no nulls."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SpecModel(ApiModel):
    """Base of the spec's models: as ApiModel, and every float must be finite."""

    model_config = ConfigDict(**ApiModel.model_config, allow_inf_nan=False)
