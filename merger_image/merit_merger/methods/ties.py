"""TIES merging: trim, elect sign, disjoint mean (Yadav et al., 2023).

Formula, per tensor, with tau_k = theta_k - theta0:
  trim:   keep the k = max(1, floor(density * numel)) entries of tau_k largest in |tau_k|
          (per expert, per tensor), zero the rest -> tau'_k;
  elect:  s = sign(sum_k tau'_k), with s = +1 where the sum is 0 (mergekit's convention);
  mean:   m = sum_k tau'_k [sign(tau'_k) = s] / max(1, #{k : sign(tau'_k) = s});
  theta = theta0 + lambda * m.
Parameters: density (default 0.2, the paper's k = 20%), scale (lambda, default 1.0).
Needs whole tensors (the trim ranks all entries of a tensor), so it is not fed row blocks.
Memory: two passes over the experts, keeping only each expert's keep mask (1 byte per
element) between them and recomputing tau'_k from the stored inputs, instead of all K
trimmed taus in fp32 at once: about 7 fp32 copies of the tensor plus K masks, whatever K.
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


def keep_top(tau: torch.Tensor, density: float) -> torch.Tensor | None:
    """Mask of the top max(1, floor(density * numel)) magnitudes of tau (None: keep all)."""
    if density >= 1 or tau.numel() == 0:
        return None
    k = max(1, int(density * tau.numel()))
    keep = torch.zeros(tau.shape, dtype=torch.bool)
    keep.view(-1)[torch.topk(tau.reshape(-1).abs(), k, sorted=False).indices] = True
    return keep


def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, density: float,
         scale: float) -> torch.Tensor:
    def trimmed(k: int) -> torch.Tensor:
        tau = experts[k].float() - base
        return tau if keeps[k] is None else tau.masked_fill_(~keeps[k], 0.0)

    base = base.float()  # the engine hands the stored dtype (stored_dtype_ok)
    keeps: list[torch.Tensor | None] = []
    total = torch.zeros_like(base, dtype=torch.float32)
    for theta in experts:
        tau = theta.float() - base
        keeps.append(keep_top(tau, density))
        total.add_(tau if keeps[-1] is None else tau.masked_fill_(~keeps[-1], 0.0))
        del tau
    elected = torch.where(total >= 0, 1.0, -1.0)
    count, mean = total.zero_(), torch.zeros_like(total)
    for k in range(len(experts)):
        tau = trimmed(k)
        agree = torch.sign(tau) == elected
        count.add_(agree)
        mean.add_(tau.masked_fill_(~agree, 0.0))
        del tau, agree
    return mean.div_(count.clamp_(min=1)).mul_(scale).add_(base)


@register
class TiesMerge(MergeMethod):
    key = "ties"
    spec_name = "ties"
    Params = TiesParams
    elementwise = False
    stored_dtype_ok = True  # tau_k = theta_k - theta0 converts theta_k as it subtracts
    mergekit = "ties"

    def merge(self, inputs: MergeInputs, params: TiesParams) -> torch.Tensor:
        return ties(inputs.base, inputs.experts, density=params.density, scale=params.scale)
