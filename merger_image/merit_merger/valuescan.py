"""The verification scan with numpy: stored values checked, update norms summed, no torch.

Before a merge, `verification` reads every float tensor of the base and of each partition
once: NaN/Inf and magnitude of theta_k and of stored second moments (the rule is
`streamcheck.bounds_problem`), and each partition's squared update norm ||theta_k - theta0||^2
per tensor. This module reads full-weight partitions itself, so a merge that takes the fused
pass (`fusedmerge`) never imports torch (3 s of a 6 s merge of a 1B model); LoRA partitions
(built with torch) and the streamed merge pass come as torch blocks to
`verification.NormScan`, which judges them here too (`judge_block`), so the numbers agree bit
for bit whichever way a block came.

The same blocks in the same order as the torch pass (`io.block_rows`), so the same problem
is reported first; a block's sum of squares is an fp32 dot, the blocks' sums added in Python
floats. Blocks are read and reduced on one thread per core (numpy's reductions release the
GIL); their results are taken in order.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from meritrun.errors import ContributionRejected

from .dtypes import WIDENED, to_float32
from .io import Item, ModelReader, block_rows
from .moments import MomentReader
from .streamcheck import bounds_problem

Problem = tuple[str, str]


def scannable(base: ModelReader, experts: Sequence[ModelReader | None],
              moments: Sequence[MomentReader] | None) -> bool:
    """Whether this scan covers these inputs: full weights (no LoRA), in float dtypes numpy
    widens (not fp8)."""
    if any(e is None for e in experts):
        return False
    readers = [base, *experts, *(m.reader for m in moments or [])]
    return all(r.meta(n).dtype.name in WIDENED for r in readers for n in r.names
               if r.meta(n).dtype.is_floating_point)


def scan(names: Sequence[str], base: ModelReader, experts: Sequence[ModelReader],
         moments: Sequence[MomentReader] | None, *, chunk_elements: int,
         threads: int | None = None
         ) -> tuple[dict[str, dict[str, float]], list[ContributionRejected]]:
    """({tensor: {partition: update norm}}, refusals) of the partitions `names` (one expert
    reader each); a refused partition has no norms and only its first problem."""
    items = [(m.name, r) for m in map(base.meta, base.names) if m.dtype.is_floating_point
             for r in block_rows(m, chunk_elements, elementwise=True)]

    buffers = _Buffers()

    def one(item: Item) -> list[tuple[Problem | None, float]]:
        return _block(item, base, experts, moments, buffers)

    refused: dict[str, ContributionRejected] = {}
    sq: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(threads or len(os.sched_getaffinity(0)),
                            thread_name_prefix="verify-scan") as pool:
        for (tensor, _), results in zip(items, pool.map(one, items), strict=True):
            for p, (problem, s) in zip(names, results, strict=True):
                if p in refused:
                    continue
                if problem is not None:
                    refused[p] = ContributionRejected(p, *problem)
                    continue
                per = sq.setdefault(tensor, {})
                per[p] = per.get(p, 0.0) + s
    norms = {t: {p: math.sqrt(v) for p, v in per.items() if p not in refused}
             for t, per in sq.items()}
    return norms, list(refused.values())


class _Buffers(threading.local):
    """Each scan thread's arrays, grown on demand and reused block after block (fresh ones
    cost a page fault per 4 KiB: 14 s of system time over a 1B model's 10 GB)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, nbytes: int) -> np.ndarray:
        """A uint8 array of at least `nbytes`, 4-byte aligned (viewed as fp32)."""
        have = self.arrays.get(key)
        if have is None or have.size < nbytes:
            have = self.arrays[key] = np.empty(-(-nbytes // 4), np.float32).view(np.uint8)
        return have


def _block(item: Item, base: ModelReader, experts: Sequence[ModelReader],
           moments: Sequence[MomentReader] | None, buffers: _Buffers
           ) -> list[tuple[Problem | None, float]]:
    """`judge_block` of each expert's block `item`."""
    name, rows = item
    meta = base.meta(name)
    start, stop = rows if rows is not None else (0, meta.rows)
    count = (stop - start) * (meta.numel // max(1, meta.rows))

    def fp32(reader: ModelReader, what: str) -> np.ndarray:
        dtype = reader.meta(name).dtype
        raw = reader.read_array(name, rows, out=buffers.get(f"{what}-raw", count * dtype.itemsize))
        return to_float32(raw, dtype, out=buffers.get(what, 4 * count).view(np.float32))

    theta0 = fp32(base, "base")
    out: list[tuple[Problem | None, float]] = []
    for i, expert in enumerate(experts):
        theta = fp32(expert, "theta")
        v = None
        if moments is not None and not moments[i].factored(name, meta.shape):
            v = moments[i].stored_array(name, meta.shape, rows)
        out.append(judge_block(name, theta0, theta, v,
                               scratch=buffers.get("d", 4 * count).view(np.float32)))
    return out


def judge_block(name: str, theta0: np.ndarray, theta: np.ndarray, v: np.ndarray | None, *,
                scratch: np.ndarray | None = None) -> tuple[Problem | None, float]:
    """One expert's block of tensor `name` (flat fp32 arrays; v: its stored second moments):
    the first problem (theta's, then v's), else None and sum (theta - theta0)^2, an fp32 dot
    (the difference in `scratch` when given). |theta|, |theta0| <= MAX_MAGNITUDE, so a
    block's fp32 sum stays finite (4e30 x 1e6 elements < 3.4e38); the caller adds blocks up
    in Python floats."""
    problem = first_problem(name, _bounds(theta), None if v is None else _bounds(v))
    if problem is not None:
        return problem, 0.0
    d = np.subtract(theta, theta0, out=None if scratch is None else scratch[:theta.size])
    return None, float(np.dot(d, d))


Bounds = tuple[float, float] | None  # the least and greatest of a block's values (None: empty)


def first_problem(name: str, theta: Bounds, v: Bounds) -> Problem | None:
    """The rule of a block of tensor `name`, given the bounds of an expert's values and of its
    stored second moments (None: none stored): theta's problem first, then v's. The fused
    pass (`fusedscan`) judges its units by it too."""
    problem = None if theta is None else bounds_problem(name, *theta)
    if problem is None and v is not None:
        problem = bounds_problem(name, *v, moments=True)
    return problem


def _bounds(values: np.ndarray) -> Bounds:
    if not values.size:
        return None
    return float(values.min()), float(values.max())
