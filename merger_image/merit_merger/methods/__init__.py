"""Merge methods, one small module each, registered by name (mergekit's shape).

A method is a pure function of ONE tensor: the base block theta0 (fp32, or None when the
method does not read it), the experts' blocks theta_k (fp32), their token weights (already
renormalised over the included partitions), and optionally their second moments v_k and FFG
thresholds t_k -> the merged block in fp32. The engine owns all I/O, streaming and casting;
it asks each method what it needs (`needs_base`, `needs_moments`, `needs_thresholds`) and
whether it may be fed blocks of rows (`elementwise`) or needs whole tensors.

Torch: this registry, the methods' declarations and their Params import without torch, so a
merge that takes the fused pass (`fusedmerge`) never loads it (3 s of a 6 s merge); the
methods' torch math imports torch where it runs.

Names: kebab keys (`token-weighted`) and the spec's camelCase names (`tokenWeighted`) both
resolve through `get_method`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from meritrun.errors import SpecError

if TYPE_CHECKING:
    import torch


@dataclass
class TensorStats:
    """Per-expert counters a method may fill while merging one tensor (summed over blocks)."""

    kept: list[int] | None = None  # FFG: elements each expert's mask kept
    fallback: int = 0  # elements where every expert was masked (base value used)


@dataclass(frozen=True)
class Rank1Moment:
    """A block of rank-1 second moments, v = outer(row, col) / total, kept factored: its
    power v^p = outer((row / total)^p, col^p) costs one outer product, not three passes."""

    row: torch.Tensor  # the block's rows only
    col: torch.Tensor
    total: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row.numel(), self.col.numel())

    def dense(self) -> torch.Tensor:
        import torch  # only where a merge takes the torch pass (see the module docstring)

        if self.total == 0.0:  # never had a gradient: v = 0, not NaN
            return torch.zeros(self.shape, device=self.row.device)
        return torch.outer(self.row / self.total, self.col)

    def power(self, p: float) -> torch.Tensor:
        import torch  # only where a merge takes the torch pass (see the module docstring)

        if self.total == 0.0:
            return torch.zeros(self.shape, device=self.row.device)
        if p == 0.5:
            return torch.outer((self.row / self.total).sqrt_(), self.col.sqrt())
        return torch.outer((self.row / self.total).pow_(p), self.col.pow(p))


Moment = "torch.Tensor | Rank1Moment"  # a block of second moments (an annotation)


def dense_moment(v: Moment, shape: torch.Size) -> torch.Tensor:
    return (v.dense() if isinstance(v, Rank1Moment) else v).reshape(shape)


@dataclass(frozen=True)
class MergeInputs:
    name: str
    base: torch.Tensor | None
    experts: Sequence[torch.Tensor]
    weights: Sequence[float]
    moments: Sequence[Moment] | None = None
    # per expert: FFG's over the whole model, or TIES's over this tensor (see the method)
    thresholds: Sequence[float] | None = None
    stats: TensorStats = field(default_factory=TensorStats)
    # an fp32 buffer of the block's shape a method may put its result in (the engine reuses
    # it block after block instead of allocating); methods that ignore it return a new tensor
    out: torch.Tensor | None = None


@dataclass(frozen=True)
class NoParams:
    pass


class MergeMethod:
    """Base of every method: declares its key, spec name, parameters and needs."""

    key: ClassVar[str]
    spec_name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    needs_base: ClassVar[bool] = True
    needs_moments: ClassVar[bool] = False
    uses_token_weights: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True
    accepts_lora: ClassVar[bool] = True
    # True: merge() takes base and experts in their stored float dtype (bf16, fp16, fp32) and
    # accumulates in fp32 itself, so the engine skips a conversion pass per input
    stored_dtype_ok: ClassVar[bool] = False
    mergekit: ClassVar[str | None] = None  # the mergekit method reproducing it, if any

    def parse_params(self, values: Mapping[str, Any], *, strict: bool = True) -> Any:
        """The method's Params from a dict; unknown keys are an error (strict) or dropped."""
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(k for k, v in values.items() if k not in known and v is not None)
        if unknown and strict:
            raise SpecError(f"method {self.key} takes no parameter(s) {unknown}; "
                            f"it takes {sorted(known) or 'none'}", path="merge")
        given = {k: v for k, v in values.items() if k in known and v is not None}
        try:
            return self.Params(**given)
        except (TypeError, ValueError) as e:
            raise SpecError(f"method {self.key}: {e}", path="merge") from e

    def needs_thresholds(self, params: Any) -> bool:
        """One threshold per expert over the whole model (FFG's), found by a pre-pass."""
        return False

    def needs_tensor_thresholds(self, params: Any) -> bool:
        """One threshold per expert and tensor (TIES's trim), found by a pre-pass: the k-th
        largest `saliency` of the tensor, k = `tensor_k`."""
        return False

    def tensor_k(self, numel: int, params: Any) -> int:
        raise NotImplementedError(f"{self.key} has no per-tensor threshold")

    def uses_base(self, params: Any) -> bool:
        """Whether merging reads theta0 (a weighted average of full models does not)."""
        return self.needs_base

    def saliency(self, base: torch.Tensor, expert: torch.Tensor, moment: torch.Tensor,
                 params: Any) -> torch.Tensor:
        raise NotImplementedError(f"{self.key} has no per-model pre-pass")

    def merge(self, inputs: MergeInputs, params: Any) -> torch.Tensor:
        raise NotImplementedError


METHODS: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available under its kebab key and spec name."""
    METHODS[cls.key] = cls()
    return cls


def method_key(name: str) -> str:
    """`tokenWeighted`, `token_weighted`, `token-weighted` -> `token-weighted`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name.strip()).replace("_", "-").lower()


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(method_key(name))
    if method is None:
        raise SpecError(f"unknown merge method {name!r}; known: {sorted(METHODS)}",
                        path="merge.method")
    return method


def normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return [float(w) / total for w in weights]


def keep_count(numel: int, density: float) -> int:
    """How many of numel magnitudes a density keeps (before ties): max(1, floor(density *
    numel)); FFG counts over the whole model, TIES's trim over one tensor."""
    return max(1, min(numel, int(density * numel)))


def check_density(density: float | None) -> None:
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


def check_finite(**values: float | None) -> None:
    """Refuse NaN and +-inf by parameter name: a non-finite lambda, power or epsilon makes a
    model of NaNs, which no later check should be the first to see."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


from . import dare, ota, task_arithmetic, ties, token_weighted, uniform  # noqa: E402,F401

__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Moment", "Rank1Moment", "TensorStats",
           "check_finite", "dense_moment", "get_method", "keep_count", "method_key", "normalized",
           "register"]
