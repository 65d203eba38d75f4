"""The plain average of the partitions (linear merge with equal weights).

Formula: theta = (1/K) sum_k theta_k. Parameters: none. The baseline that ignores how much
data each partition saw; it never reads the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import MergeInputs, MergeMethod, register
from .token_weighted import token_weighted

if TYPE_CHECKING:
    import torch


def uniform(experts: Sequence[torch.Tensor], *, out: torch.Tensor | None = None) -> torch.Tensor:
    return token_weighted(experts, [1.0] * len(experts), out=out)


@register
class UniformMerge(MergeMethod):
    key = "uniform"
    spec_name = "uniform"
    needs_base = False
    stored_dtype_ok = True
    mergekit = "linear"

    def merge(self, inputs: MergeInputs, params: object) -> torch.Tensor:
        return uniform(inputs.experts, out=inputs.out)
