"""The norm scan of a streamed merge inside the fused pass: per unit, each expert's squared
update norm and the value checks, from the unit's buffers, no torch.

A merge whose inputs are read from storage judges the update norms in its merge pass
(`verification.NormScan`, handed to `merge_models(observe=...)`), so each input is read
twice, not three times. The torch pass gives NormScan torch blocks; the fused pass runs
`scan_range` on each unit's buffers (the experts, the base and any stored second moments,
already read for the merge kernel, before it runs) and gives NormScan the unit's judgments
in unit order (`NormScan.judged`). The rule is `valuescan.first_problem`: theta's problem
first (non-finite, magnitude), then its stored moments' (negative, non-finite, above the
bound), over the unit's values.

How the sums are ordered (they equal the staged scan's to fp32 rounding, not bit for bit:
that one is an fp32 dot per engine block, whose order is BLAS's): d = x_k - theta0 in fp32
(as `valuescan.judge_block` takes it); d * d in fp64 (exact: 24-bit mantissas); element i
of a unit adds into lane (i - lo) mod LANES, in element order, and the lanes are added
0, 1, ..., LANES - 1 at the unit's end; the units' sums are added in Python floats in tensor
order (NormScan). So a unit's sum does not depend on the machine or the thread count, and
differs from the exact sum by a few fp64 roundings, far below the fp32 dot's.

The least and greatest values come as order keys of their fp32 bits (`fusedbounds`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from .fused import BF16, CHUNK, F32, _widen
from .fusedbounds import MAGNITUDE, key_bounds, value_of
from .valuescan import Problem, first_problem

LANES = 256  # partial sums per expert: 2 KiB of fp64, the element-wise loop vectorises

Judgment = tuple[Problem | None, float]
Scan = Callable[[np.ndarray, int, int], list[Judgment]]


@njit(cache=True, nogil=True)
def scan_range(addresses, codes, k_count, stored, lo, hi, sq, keys):
    """Over elements [lo, hi): sq[k] = sum (x_k - theta0)^2 (see the module docstring for
    the order); keys[j] = the least and greatest order keys of input j's values (j < K: the
    experts; K <= j: the `stored` second moments, the experts' in order). addresses / codes:
    the K experts, the base, then the stored moments."""
    b = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    bits = x.view(np.int32)
    lanes = np.zeros((k_count, LANES), np.float64)
    for j in range(k_count + stored):
        keys[j, 0], keys[j, 1] = MAGNITUDE, -MAGNITUDE
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        _widen(addresses[k_count], codes[k_count], start, n, b)
        for k in range(k_count):
            _widen(addresses[k], codes[k], start, n, x)
            _square_into(x, b, n, lanes[k])
            keys[k, 0], keys[k, 1] = key_bounds(bits, n, keys[k, 0], keys[k, 1])
        for j in range(k_count, k_count + stored):
            _widen(addresses[j + 1], codes[j + 1], start, n, x)
            keys[j, 0], keys[j, 1] = key_bounds(bits, n, keys[j, 0], keys[j, 1])
    for k in range(k_count):
        total = 0.0
        for lane in range(LANES):
            total += lanes[k, lane]
        sq[k] = total


@njit(cache=True, nogil=True, inline="always")
def _square_into(x, b, n, lanes):
    """lanes[i mod LANES] += (x[i] - b[i])^2 for i < n, each lane in element order: an
    element-wise loop over the lanes, which vectorises (a sum would not, unless reordered)."""
    whole = n - n % LANES
    for at in range(0, whole, LANES):
        xs, bs = x[at:at + LANES], b[at:at + LANES]
        for lane in range(LANES):
            d = np.float64(xs[lane] - bs[lane])
            lanes[lane] += d * d
    for i in range(whole, n):
        d = np.float64(x[i] - b[i])
        lanes[i - whole] += d * d


def scanner(name: str, k_count: int, codes: np.ndarray, *, stored: bool,
            held: np.ndarray | None = None) -> Scan:
    """The scan of one tensor's units: (addresses, lo, hi) -> each expert's judgment
    (problem, squared update norm). codes: the experts', the base's, then (`stored`) the
    experts' stored moments'; `held`: the addresses of the experts and the base where a
    plan holds them (the unit's own addresses there are not theirs)."""
    moments = k_count if stored else 0

    def scan(addresses: np.ndarray, lo: int, hi: int) -> list[Judgment]:
        if held is not None:
            addresses = addresses.copy()
            addresses[:len(held)] = held
        sq = np.empty(k_count, np.float64)
        keys = np.empty((k_count + moments, 2), np.int32)
        scan_range(addresses, codes, k_count, moments, lo, hi, sq, keys)
        bounds = [(value_of(int(a)), value_of(int(b))) for a, b in keys]
        out: list[Judgment] = []
        for k in range(k_count):
            problem = first_problem(name, bounds[k], bounds[k_count + k] if stored else None)
            out.append((problem, 0.0) if problem is not None else (None, float(sq[k])))
        return out

    return scan


def judge_empty(k_count: int) -> list[Judgment]:
    """An empty tensor's judgments: nothing wrong, a norm of 0 (as the staged scan has it)."""
    return [(None, 0.0)] * k_count


def warm() -> None:
    """Compile (or load from the cache) the scan's specialisation."""
    data = np.zeros(64, np.uint8)
    at = data.ctypes.data
    scan_range(np.array([at, at + 16, at + 32], np.int64), np.array([BF16, F32, BF16], np.int64),
               1, 1, 0, 2, np.empty(1, np.float64), np.empty((2, 2), np.int32))

