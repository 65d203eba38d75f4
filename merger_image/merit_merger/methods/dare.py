"""DARE: drop and rescale each task vector at random, then add them (Yu et al., 2023).

Formula, per tensor, with tau_k = theta_k - theta0:
  keep_k ~ Bernoulli(density) per element, drawn from a generator seeded by
  (seed, tensor name, k), so a merge is reproducible and independent of tensor order;
  theta = theta0 + lambda * sum_k keep_k * tau_k / density.
Parameters: density (keep probability, default 0.5), scale (lambda, default 1.0), seed
(default 0). Whole tensors (the random stream covers a tensor at once), not row blocks.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import MergeInputs, MergeMethod, check_density, check_finite, register

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DareParams:
    density: float = 0.5
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_density(self.density)
        check_finite(scale=self.scale)


def dare_seed(seed: int, name: str, index: int) -> int:
    """A deterministic 63-bit seed per (run seed, tensor name, expert index)."""
    return (zlib.crc32(f"{name}\0{index}".encode()) + (seed << 32)) & ((1 << 63) - 1)


def keep_mask(shape: torch.Size, *, density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) keep mask, drawn on the CPU so every device gets the same draw."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


def dare(base: torch.Tensor, experts: Sequence[torch.Tensor], *, name: str, density: float,
         scale: float, seed: int) -> torch.Tensor:
    import torch  # only where a merge takes the torch pass (see `methods`)

    base = base.float()  # the engine hands the stored dtype (stored_dtype_ok)
    total = torch.zeros_like(base, dtype=torch.float32)
    for k, theta in enumerate(experts):
        tau = theta.float() - base
        if density < 1:
            keep = keep_mask(tau.shape, density=density, seed=dare_seed(seed, name, k))
            tau = torch.where(keep.to(tau.device), tau, 0.0).div_(density)
        total.add_(tau)
    return total.mul_(scale).add_(base)


@register
class DareMerge(MergeMethod):
    key = "dare"
    spec_name = "dare"
    Params = DareParams
    elementwise = False
    stored_dtype_ok = True  # tau_k = theta_k - theta0 converts theta_k as it subtracts
    mergekit = "dare_linear"

    def merge(self, inputs: MergeInputs, params: DareParams) -> torch.Tensor:
        return dare(inputs.base, inputs.experts, name=inputs.name, density=params.density,
                    scale=params.scale, seed=params.seed)
