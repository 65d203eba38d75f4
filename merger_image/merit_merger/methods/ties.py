"""TIES merging: trim, elect sign, disjoint mean (Yadav et al., 2023).

Formula, per tensor, with tau_k = theta_k - theta0:
  trim:   keep the k = max(1, floor(density * numel)) entries of tau_k largest in |tau_k|
          (per expert, per tensor), zero the rest -> tau'_k;
  elect:  s = sign(sum_k tau'_k), with s = +1 where the sum is 0 (mergekit's convention);
  mean:   m = sum_k tau'_k [sign(tau'_k) = s] / max(1, #{k : sign(tau'_k) = s});
  theta = theta0 + lambda * m.
Parameters: density (default 0.2, the paper's k = 20%), scale (lambda, default 1.0).
Needs whole tensors (the trim ranks all entries of a tensor), so it is not fed row blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import MergeInputs, MergeMethod, check_density, check_finite, register


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_density(self.density)
        check_finite(scale=self.scale)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its top max(1, floor(density * numel)) magnitudes set to zero."""
    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).reshape(tau.shape)


def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, density: float,
         scale: float) -> torch.Tensor:
    trimmed = torch.stack([trim(theta.float() - base, density) for theta in experts])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agree = torch.sign(trimmed) == elected
    count = agree.sum(dim=0).clamp_(min=1)
    mean = torch.where(agree, trimmed, 0.0).sum(dim=0).div_(count)
    return mean.mul_(scale).add_(base)


@register
class TiesMerge(MergeMethod):
    key = "ties"
    spec_name = "ties"
    Params = TiesParams
    elementwise = False
    mergekit = "ties"

    def merge(self, inputs: MergeInputs, params: TiesParams) -> torch.Tensor:
        return ties(inputs.base, inputs.experts, density=params.density, scale=params.scale)
