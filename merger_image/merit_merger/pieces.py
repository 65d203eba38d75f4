"""Element-wise merge math on every core: a block cut into pieces of rows, merged by threads.

An element-wise method's result at an element depends only on that element of its inputs,
so a block can be cut into row ranges merged independently, with the same bits as merging
the block at once. The engine hands each block's pieces to a pool of threads, one per core,
each running torch with one intra-op thread: torch's own intra-op parallelism synchronises
its threads at every op (an OpenMP barrier per op), and on a busy machine each barrier waited
for a descheduled partner (a 1B-parameter merge took 91 s of user time with 2 OpenMP threads
against 10 s with one); here a thread that is descheduled delays only its own pieces. Pieces
are small enough (`PIECE_ELEMENTS`) that a piece's fp32 sum stays in the core's cache while
the K inputs are added into it.

Each piece is merged, cast to the output dtype into its rows of the output block and checked
for NaN/Inf by the thread that merged it. Temporaries are allocated and freed by the thread
that uses them (buffers freed across threads grew glibc's arenas in a probe); the block's
buffers are the engine's, allocated in the main thread and only sliced here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from .methods import MergeInputs, Moment, Rank1Moment, TensorStats

PIECE_ELEMENTS = 1 << 18  # 1 MiB of fp32 per piece: the running sum stays in L2
TRIM_EVERY = 64  # blocks between two returns of the allocator's free memory to the kernel


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return None


_TRIM = _malloc_trim()


def trim_heaps() -> None:
    """Give the heaps' free memory back to the kernel (glibc's malloc_trim). A merge frees
    block-sized temporaries between small long-lived allocations (OTA's cached rank-1
    factors, Python objects), so glibc could not shrink its heaps and the resident set grew
    with every block: OTA's by 125 MB over a 1B-parameter model at K = 2 (its peak was 850
    MB above token-weighted's at K = 4); trimmed every TRIM_EVERY blocks it stays flat."""
    if _TRIM is not None:
        _TRIM(0)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. A NaN or Inf makes the fp32 sum non-finite, so a finite sum
    settles it in one vectorized pass (isfinite on bf16 measured 50x slower than a sum);
    only a non-finite sum (which finite values can reach by overflowing) is checked exactly."""
    if not t.is_floating_point() or math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def piece_rows(rows: int, numel: int, piece_elements: int = PIECE_ELEMENTS) -> list[range]:
    """Row ranges of at most piece_elements elements each (one row at least)."""
    per = max(1, piece_elements // max(1, numel // max(1, rows)))
    return [range(a, min(a + per, rows)) for a in range(0, rows, per)]


def _rows(v: Moment, r: range) -> Moment:
    if isinstance(v, Rank1Moment):
        return Rank1Moment(v.row[r.start:r.stop], v.col, v.total)
    return v[r.start:r.stop]


def sub_inputs(inputs: MergeInputs, r: range, stats: TensorStats) -> MergeInputs:
    """The same merge restricted to rows r of dim 0 (views, no copies)."""
    def cut(t):
        return None if t is None else t[r.start:r.stop]
    return replace(inputs, base=cut(inputs.base), experts=[cut(t) for t in inputs.experts],
                   moments=None if inputs.moments is None else
                   [_rows(v, r) for v in inputs.moments],
                   stats=stats, out=cut(inputs.out))


def add_stats(into: TensorStats, part: TensorStats) -> None:
    if part.kept is not None:
        into.kept = [a + b for a, b in zip(into.kept or [0] * len(part.kept), part.kept,
                                           strict=True)]
    into.fallback += part.fallback


class PieceRunner:
    """merge(inputs) -> cast into `cast_out` -> finite? over pieces, on `threads` threads."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or len(os.sched_getaffinity(0))
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="merge-math")
                      if self.threads > 1 else None)

    def run(self, merge: Callable[[MergeInputs], torch.Tensor], inputs: MergeInputs,
            cast_out: torch.Tensor) -> bool:
        """Merge into inputs.out (fp32) and cast_out (the output dtype), both of the block's
        shape; True when every output value is finite. Stats are summed into inputs.stats."""
        shape = inputs.experts[0].shape
        ranges = (piece_rows(shape[0], shape.numel()) if len(shape) >= 1
                  else [range(0, 1)])
        if len(shape) < 1 or len(ranges) == 1:
            return self._piece(merge, inputs, cast_out)
        parts = [(sub_inputs(inputs, r, TensorStats()), cast_out[r.start:r.stop])
                 for r in ranges]
        if self._pool is None:
            ok = [self._piece(merge, p, c) for p, c in parts]
        else:
            ok = list(self._pool.map(lambda pc: self._piece(merge, *pc), parts))
        for p, _ in parts:
            add_stats(inputs.stats, p.stats)
        return all(ok)

    def map(self, fn: Callable, items: Iterable) -> list:
        """[fn(x) for x in items], on the threads (independent tasks)."""
        if self._pool is None:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    @staticmethod
    def _piece(merge: Callable[[MergeInputs], torch.Tensor], inputs: MergeInputs,
               cast_out: torch.Tensor) -> bool:
        merged = merge(inputs)
        cast_out.copy_(merged)
        return all_finite(cast_out)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
