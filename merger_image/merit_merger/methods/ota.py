"""OTA: curvature-aware merging with Adam second moments, optionally with Fast Fisher Grafting.

Formula, element-wise, with tau_i = theta_i - theta0 and v_i expert i's Adam exp_avg_sq
(full, or the rank-1 v_hat = outer(row, col) / total):
  w_i = (v_i^p + eps) * m_i
  theta = theta0 + sum_i w_i tau_i / sum_i w_i, and theta0 where sum_i w_i = 0
          (every expert masked at that element).
FFG (with `density`): saliency s_i = v_i * tau_i^2; t_i is the k-th largest s_i over ALL
elements of expert i's model, k = max(1, floor(density * N)) (one global threshold per model,
found by the engine's pre-pass); m_i = [s_i >= t_i] (ties at t_i are kept). Without density
m_i = 1.
Parameters: power (p, default 0.5), epsilon (default 1e-26: it must stay tiny relative to
v^p, or OTA silently becomes a plain average), density (FFG keep fraction, default off).
Computed in fp32; the engine casts to the output dtype. Needs full-weight partitions with
second moments (a LoRA adapter's moments are not the moments of the full weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import (
    MergeInputs,
    MergeMethod,
    Moment,
    Rank1Moment,
    TensorStats,
    check_density,
    check_finite,
    dense_moment,
    register,
)

if TYPE_CHECKING:
    import torch

FP32_TINY = float(np.finfo(np.float32).tiny)  # torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class OtaParams:
    power: float = 0.5
    epsilon: float = 1e-26
    density: float | None = None

    def __post_init__(self) -> None:
        check_density(self.density)
        check_finite(power=self.power, epsilon=self.epsilon)
        if self.power <= 0 or self.epsilon < 0:
            raise ValueError("power must be > 0 and epsilon >= 0")


def ffg_saliency(base: torch.Tensor, theta: torch.Tensor, v: Moment) -> torch.Tensor:
    """s = (theta - theta0)^2 * v, element-wise, fp32."""
    return (theta.float() - base).square_().mul_(dense_moment(v, theta.shape))


def ota_weight(v: Moment, *, power: float, epsilon: float) -> torch.Tensor:
    """v^p + eps (a fresh tensor); rank-1 moments are raised to p through their factors."""
    if isinstance(v, Rank1Moment):
        w = v.power(power)
    else:
        w = v.sqrt() if power == 0.5 else v.pow(power)
    return w.add_(epsilon)


def ota(base: torch.Tensor | None, experts: Sequence[torch.Tensor], moments: Sequence[Moment], *,
        power: float = 0.5, epsilon: float = 1e-26, thresholds: Sequence[float] | None = None,
        stats: TensorStats | None = None) -> torch.Tensor:
    """theta0 + sum w_i tau_i / sum w_i, computed as sum w_i theta_i / sum w_i (the same value,
    one pass less per expert); theta0 where sum w_i = 0. `base` may be None only without
    masks and with epsilon > 0 (then sum w_i > 0 everywhere)."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    if stats is not None and thresholds is not None and stats.kept is None:
        stats.kept = [0] * len(experts)
    num = den = None
    for i, (theta, v) in enumerate(zip(experts, moments, strict=True)):
        theta = theta.float()
        w = ota_weight(v, power=power, epsilon=epsilon).reshape(theta.shape)
        if thresholds is not None:
            keep = ffg_saliency(base, theta, v).ge_(thresholds[i])
            w.mul_(keep)
            if stats is not None:
                stats.kept[i] += int(keep.sum())
        if num is None:
            num, den = w * theta, w
        else:
            num.addcmul_(w, theta)
            den.add_(w)
    if base is None:
        return num.div_(den)
    masked = den == 0
    if stats is not None and thresholds is not None:
        stats.fallback += int(masked.sum())
    return torch.where(masked, base, num.div_(den))


@register
class OtaMerge(MergeMethod):
    key = "ota"
    spec_name = "ota"
    Params = OtaParams
    needs_moments = True
    accepts_lora = False

    def needs_thresholds(self, params: OtaParams) -> bool:
        return params.density is not None

    def uses_base(self, params: OtaParams) -> bool:
        # without masks and with an epsilon fp32 can hold, every sum of weights is > 0
        return params.density is not None or params.epsilon < FP32_TINY

    def saliency(self, base: torch.Tensor, expert: torch.Tensor, moment: Moment,
                 params: OtaParams) -> torch.Tensor:
        return ffg_saliency(base, expert, moment)

    def merge(self, inputs: MergeInputs, params: OtaParams) -> torch.Tensor:
        thresholds = inputs.thresholds if params.density is not None else None
        return ota(inputs.base, inputs.experts, inputs.moments, power=params.power,
                   epsilon=params.epsilon, thresholds=thresholds, stats=inputs.stats)
