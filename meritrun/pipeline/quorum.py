"""The one quorum rule: how many of the plan's partitions must be merged.

Counted over the PLAN's partitions, never over what reached the merge: a partition that failed
in training and one refused by the merge both count as missing. The pipeline checks it before
the merge and after (refusals), and passes the numbers to the merge stage
(`MergeParams.planned`, `MergeParams.required`), which uses them instead of recomputing.
"""

from __future__ import annotations

import math


def required(planned: int, quorum: float) -> int:
    """Accepted contributions needed out of `planned` (at least one)."""
    return max(1, math.ceil(quorum * planned - 1e-9))


def met(accepted: int, *, planned: int, needed: int) -> bool:
    return planned > 0 and accepted >= needed


def shortfall(accepted: int, *, planned: int, needed: int, quorum: float) -> str:
    """The sentence a run fails with when the quorum is not met."""
    return (f"{accepted}/{planned} partitions usable; quorum {quorum} needs {needed} of "
            f"{planned}")
