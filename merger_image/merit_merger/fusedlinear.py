"""The linear methods' plans in the fused pass: token-weighted, uniform, task arithmetic.

Their per-merge constants (the weights, lambda, 1 - K lambda, as the torch methods compute
them) and each tensor's program, for the CPU's kernel (`fused.merge_range`) and the GPU's
(`gpuunits.linear`, imported only for a merge on a GPU: it imports torch and triton).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import fused
from .fusedplan import FusedMethod, Merge, Plan, Tensor
from .methods import normalized


def terms(merge: Merge) -> tuple[np.ndarray, np.float32, np.float32]:
    """As token_weighted() and task_arithmetic() compute them: weights renormalised again
    (uniform: equal), lambda, 1 - K lambda; all rounded to fp32 as torch's scalars are."""
    k = merge.k
    w = np.asarray(normalized([1.0] * k if merge.method == "uniform" else merge.weights),
                   np.float32)
    scale = float(getattr(merge.params, "scale", 1.0))
    return w, np.float32(scale), np.float32(1.0 - k * scale)


def program(method: str, t: Tensor) -> int:
    """`fused`'s program of a linear method on tensor t."""
    if method != "task-arithmetic":
        return fused.TOKEN_WEIGHTED
    small = all(m.dtype.itemsize <= 2 for m in (t.base, *t.experts))
    return fused.TASK16 if small else fused.TASK32


def prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """Token-weighted, uniform and task arithmetic through `fused.merge_range`."""
    w, scale32, coefficient = terms(merge)

    def plan(t: Tensor) -> Plan:
        chosen, codes = program(merge.method, t), t.codes()

        def kernel(addresses: np.ndarray, lo: int, hi: int) -> bool:
            return fused.merge_range(chosen, addresses, codes, w, scale32, coefficient, lo, hi)

        return Plan(kernel, reads_base=chosen != fused.TOKEN_WEIGHTED)

    return plan


def gpu_prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """The plans of the GPU's kernel (`gpuunits.linear`) with the same constants."""
    from . import gpuunits

    return gpuunits.linear(merge, *terms(merge), program_of=lambda t: program(merge.method, t))


METHOD = FusedMethod(prepare, warm=fused.warm)
