"""Token budgets: every arm of a comparison must train on the same supervised tokens.

MERIT's claim is about how the same data is split, not about more compute, so the joint run,
the random split and the MERIT splits all train one epoch over the whole mixture (each
partition one epoch over its own sources: the partition budgets sum to the joint budget
exactly); only `joint-2ep` (the paper's control) gets twice that, and the tables say so. For
the mixture-search check, `mixture_counts` turns simplex weights into example counts whose
supervised tokens split the same budget in those proportions. Pure functions, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def arm_epochs(arm: str) -> float:
    """Passes over each partition's own data: 2 for the joint-2-epoch control, else 1."""
    return 2.0 if arm == "joint-2ep" else 1.0


def mixture_counts(
    weights: Sequence[float], tokens_per_example: Sequence[float], budget: int
) -> list[int]:
    """Examples to draw per domain so domain i contributes about weights[i] * budget
    supervised tokens (each at least one example)."""
    if len(weights) != len(tokens_per_example):
        raise ValueError("one weight per domain")
    total = float(sum(weights))
    if total <= 0 or budget <= 0:
        raise ValueError("weights and budget must be positive")
    return [max(1, round(w / total * budget / t)) for w, t in zip(weights, tokens_per_example,
                                                                  strict=True)]


def budget_gap(trained: Sequence[int], budget: int) -> float:
    """Relative difference between the tokens an arm trained on (summed) and its budget."""
    return (sum(trained) - budget) / budget
