"""Task arithmetic: add the scaled sum of the task vectors to the base.

Formula: theta = theta0 + lambda * sum_k tau_k, tau_k = theta_k - theta0.
Parameters: scale (lambda, default 1.0). Unlike the averages it adds the updates up, so with
K partitions lambda around 1/K keeps the update size of one partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import MergeInputs, MergeMethod, check_finite, register

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_finite(scale=self.scale)


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], *, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """In fp32 whatever the inputs' float dtype (the in-place ops convert as they go); into
    `out` (fp32, the base's shape) when given.

    16-bit inputs: lambda * sum_k theta_k + (1 - K lambda) theta0, K + 2 passes. Its fp32
    rounding error, a few ulps of K |theta|, is far below the inputs' own precision (a bf16
    weight is known to 2^-9 of itself, the rounding here to about 2^-21). fp32 inputs keep
    theta0 + lambda * sum_k (theta_k - theta0), 2K + 3 passes: each tau_k is exact there,
    and an fp32 model's update would otherwise lose bits to the cancellation."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    total = torch.empty_like(base, dtype=torch.float32) if out is None else out
    if all(t.dtype.itemsize <= 2 for t in (base, *experts)):
        total.copy_(experts[0])
        for theta in experts[1:]:
            total.add_(theta)
        total.mul_(scale)
        coefficient = 1.0 - len(experts) * scale
        return total.add_(base, alpha=coefficient) if coefficient else total
    total.zero_()
    for theta in experts:
        total.add_(theta).sub_(base)
    return total.mul_(scale).add_(base)


@register
class TaskArithmeticMerge(MergeMethod):
    key = "task-arithmetic"
    spec_name = "taskArithmetic"
    Params = TaskArithmeticParams
    stored_dtype_ok = True
    mergekit = "task_arithmetic"

    def merge(self, inputs: MergeInputs, params: TaskArithmeticParams) -> torch.Tensor:
        return task_arithmetic(inputs.base, inputs.experts, scale=params.scale,
                               out=inputs.out)
