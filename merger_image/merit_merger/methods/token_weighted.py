"""MERIT's one-shot merge: the token-weighted average of the partitions.

Formula: theta = sum_k (n_k / sum_j n_j) theta_k, with n_k the supervised tokens partition k
trained on (manifest tokens.supervised). Weights are renormalised over the partitions that
are merged, so a refused partition's share is spread over the others in proportion.
Parameters: none. It never reads the base (a weighted average of full models needs none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import MergeInputs, MergeMethod, normalized, register

if TYPE_CHECKING:
    import torch


def token_weighted(experts: Sequence[torch.Tensor], weights: Sequence[float], *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k theta_k with w renormalised to sum to 1, in fp32 whatever the experts' float
    dtype (the in-place adds into the fp32 sum convert as they go: no fp32 copy per expert);
    into `out` (fp32, the experts' shape) when given."""
    import torch  # only where a merge takes the torch pass (see `methods`)

    w = normalized(weights)
    if out is None:
        out = experts[0].to(torch.float32, copy=True)
    else:
        out.copy_(experts[0])
    out.mul_(w[0])
    for theta, w_k in zip(experts[1:], w[1:], strict=True):
        out.add_(theta, alpha=w_k)
    return out


@register
class TokenWeightedMerge(MergeMethod):
    key = "token-weighted"
    spec_name = "tokenWeighted"
    needs_base = False
    uses_token_weights = True
    stored_dtype_ok = True
    mergekit = "linear"

    def merge(self, inputs: MergeInputs, params: object) -> torch.Tensor:
        return token_weighted(inputs.experts, inputs.weights, out=inputs.out)
