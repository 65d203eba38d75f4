"""TIES merging: trim, elect sign, disjoint mean (Yadav et al., 2023).

Formula, per tensor, with tau_k = theta_k - theta0:
  trim:   t_k = the k-th largest |tau_k| over the tensor, k = max(1, floor(density * numel))
          (per expert, per tensor); keep tau_k where |tau_k| >= t_k, zero the rest -> tau'_k
          (ties at t_k are kept, as FFG keeps them: `topk` would keep exactly k, choosing
          among equal magnitudes in an order it does not specify);
  elect:  s = sign(sum_k tau'_k), with s = +1 where the sum is 0 (mergekit's convention);
  mean:   m = sum_k tau'_k [sign(tau'_k) = s] / max(1, #{k : sign(tau'_k) = s});
  theta = theta0 + lambda * m.
Parameters: density (default 0.2, the paper's k = 20%), scale (lambda, default 1.0).
Given the thresholds, everything is element-wise: the engine finds each tensor's t_k in a
streamed pre-pass (`thresholds`: an exact radix select on the bits of |tau_k|, two passes
over the blocks) and merges blocks of rows like the averages, holding the K trimmed taus of
one piece of rows at a time. Called on a whole tensor without thresholds, it finds them with
`kthvalue` first (the same values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import MergeInputs, MergeMethod, check_density, check_finite, keep_count, register

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_density(self.density)
        check_finite(scale=self.scale)


def magnitude(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """|theta - theta0| in fp32 (a fresh tensor; base may be in its stored dtype)."""
    return (theta.float() - base.float()).abs_()


def trim_thresholds(base: torch.Tensor, experts: Sequence[torch.Tensor],
                    density: float) -> list[float] | None:
    """Each expert's k-th largest |tau| over this whole tensor (None: density 1 keeps all)."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    if density >= 1 or base.numel() == 0:
        return None
    k = keep_count(base.numel(), density)
    return [float(torch.kthvalue(magnitude(base, t).reshape(-1).cpu(), base.numel() - k + 1)
                  .values) for t in experts]


def ties_elementwise(base: torch.Tensor, experts: Sequence[torch.Tensor],
                     thresholds: Sequence[float] | None, *, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES given the trim thresholds, element by element, in fp32 (into `out` when given).
    The disjoint sum is taken as s * sum_k max(s tau'_k, 0): multiplying by s = +-1 and
    clamping are exact, so it is the same sum of the agreeing tau'_k in the same order."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    base = base.float()
    trimmed, total = [], torch.zeros_like(base)
    for k, theta in enumerate(experts):
        tau = theta.float() - base
        if thresholds is not None:
            tau.masked_fill_(tau.abs() < thresholds[k], 0.0)
        total.add_(tau)
        trimmed.append(tau)
    sign = torch.where(total >= 0, 1.0, -1.0)
    count, agreed = total.zero_(), torch.zeros_like(base)
    for tau in trimmed:
        along = tau.mul_(sign)  # |tau'_k| where it agrees with s, <= 0 elsewhere
        count.add_(along > 0)
        agreed.add_(along.clamp_(min=0.0))
    merged = agreed.mul_(sign).div_(count.clamp_(min=1.0)).mul_(scale).add_(base)
    return merged if out is None else out.copy_(merged)


def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, density: float,
         scale: float) -> torch.Tensor:
    """TIES on whole tensors (thresholds found here)."""
    return ties_elementwise(base, experts, trim_thresholds(base, experts, density), scale=scale)


@register
class TiesMerge(MergeMethod):
    key = "ties"
    spec_name = "ties"
    Params = TiesParams
    stored_dtype_ok = True  # tau_k = theta_k - theta0 converts theta_k as it subtracts
    mergekit = "ties"

    def needs_tensor_thresholds(self, params: TiesParams) -> bool:
        return params.density < 1

    def tensor_k(self, numel: int, params: TiesParams) -> int:
        return keep_count(numel, params.density)

    def saliency(self, base: torch.Tensor, expert: torch.Tensor, moment: object,
                 params: TiesParams) -> torch.Tensor:
        return magnitude(base, expert)

    def merge(self, inputs: MergeInputs, params: TiesParams) -> torch.Tensor:
        thresholds = inputs.thresholds
        if thresholds is None and params.density < 1:  # a whole tensor, not the engine's
            thresholds = trim_thresholds(inputs.base, inputs.experts, params.density)
        return ties_elementwise(inputs.base, inputs.experts, thresholds, scale=params.scale,
                                out=inputs.out)
