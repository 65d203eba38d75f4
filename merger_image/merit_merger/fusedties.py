"""Fused kernels for TIES: the per-tensor trim thresholds and the merge, stored rows in.

The torch pass (`methods/ties.py` after the `thresholds` pre-pass) converts every input to
fp32, takes |tau_k| = |theta_k - theta0| per expert as a tensor, counts its bits with
`bincount`, and merges with a dozen whole-block ops (mask, sums, sign, clamp, division).
Here one compiled loop per step reads the inputs as stored (bf16, fp16 or fp32 bits):

- `count_high` / `count_low`: the exact radix select of `selection.KthLargest`, streamed:
  pass 1 adds each expert's |tau_k| (fp32, as the torch pass computes it) into a histogram of
  its high 16 bits, pass 2 the low 16 bits of those in the bin holding the k-th largest.
  For non-negative fp32 values the bits order like the values (NaN above inf, as there), so
  `threshold` gives the same value `kthvalue` and the torch pre-pass give;
- `ties_range`: trim, elect, disjoint mean, * lambda + theta0, narrowed to the output dtype
  with the finiteness check, in `ties_elementwise`'s op order (numba contracts no a * b + c),
  so its result is the torch pass's bit for bit;
- `ties_whole`: a tensor that fits in one unit: both passes and the merge from the unit's
  buffers, so such a tensor is read once, not three times.

Compiled like `fused` (numba's on-disk cache; `warm()` fills it). It knows no files:
`fusedmerge` reads the units and runs the passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .fused import BF16, CHUNK, F16, F32, _narrow, _widen
from .methods import keep_count

if TYPE_CHECKING:
    from .fusedmerge import Kernel, Merge, Plan, Tensor

HI_BINS = 1 << 15  # the high 16 bits of |tau|: the sign bit is 0 (selection.HI_BINS)
LO_BINS = 1 << 16
# A tensor of at most HOLD_BLOCKS of the engine's blocks (the torch pre-pass's rule, which
# keeps such a tensor's K fp32 saliencies) has its K + 1 inputs held in memory as stored
# while its thresholds are counted and it is merged, so it is read once, not three times
# (1B parameters, K = 4: every tensor but the embedding; 12.7 GB read instead of 29.8). At
# most HELD tensors are held at once (one counted while the one before is merged): at most
# HELD x (K + 1) x HOLD_BLOCKS x block x itemsize (100 MB for K = 4 bf16, 1M-element blocks).
HOLD_BLOCKS = 5
HELD = 2
_MAGNITUDE = np.uint32(0x7FFFFFFF)  # abs(): the sign bit cleared, NaN included


@njit(cache=True, nogil=True, inline="always")
def _magnitudes(addresses, codes, start, n, b, xs):
    """xs[k, :n] = x_k - theta0 of elements [start, start + n) for every expert (b: theta0
    widened into it first); returns xs's bits (uint32), the sign bit still to be cleared
    (`& _MAGNITUDE`: |tau|, NaN included). addresses: the experts, then the base."""
    k_count = len(addresses) - 1
    _widen(addresses[k_count], codes[k_count], start, n, b)
    for k in range(k_count):
        x = xs[k]
        _widen(addresses[k], codes[k], start, n, x)
        for i in range(n):
            x[i] = x[i] - b[i]
    return xs.view(np.uint32)


@njit(cache=True, nogil=True)
def count_high(addresses, codes, lo, hi, hist):
    """Pass 1 over elements [lo, hi): hist[k] += the high 16 bits of each |tau_k|.
    addresses / codes: the K experts, then the base. Two experts per loop: their increments
    are independent, so one's wait on a bin just incremented overlaps the other's (1.4x)."""
    k_count = len(addresses) - 1
    b = np.empty(CHUNK, np.float32)
    xs = np.empty((k_count, CHUNK), np.float32)
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        bits = _magnitudes(addresses, codes, start, n, b, xs)
        for k in range(0, k_count - 1, 2):
            h0, h1, u0, u1 = hist[k], hist[k + 1], bits[k], bits[k + 1]
            for i in range(n):
                h0[(u0[i] & _MAGNITUDE) >> np.uint32(16)] += 1
                h1[(u1[i] & _MAGNITUDE) >> np.uint32(16)] += 1
        if k_count % 2:
            h0, u0 = hist[k_count - 1], bits[k_count - 1]
            for i in range(n):
                h0[(u0[i] & _MAGNITUDE) >> np.uint32(16)] += 1


@njit(cache=True, nogil=True)
def count_low(addresses, codes, lo, hi, bins, hist):
    """Pass 2 over elements [lo, hi): hist[k] += the low 16 bits of each |tau_k| whose high
    16 bits are bins[k]. Few are (the bin is 1/128 of an octave): a vectorised loop marks
    them, and only the 8-element words with a mark are looked into (a branch per element
    cost 2.4x as much)."""
    k_count = len(addresses) - 1
    b = np.empty(CHUNK, np.float32)
    xs = np.empty((k_count, CHUNK), np.float32)
    marks = np.zeros(CHUNK, np.uint8)  # CHUNK is a multiple of 8
    words = marks.view(np.uint64)
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        bits = _magnitudes(addresses, codes, start, n, b, xs)
        for k in range(k_count):
            h, u, chosen = hist[k], bits[k], np.uint32(bins[k])
            for i in range(n):
                marks[i] = np.uint8(((u[i] & _MAGNITUDE) >> np.uint32(16)) == chosen)
            for i in range(n, CHUNK):
                marks[i] = 0
            for w in range((n + 7) // 8):
                if words[w]:
                    for i in range(8 * w, 8 * w + 8):
                        if marks[i]:
                            h[u[i] & np.uint32(0xFFFF)] += 1


@njit(cache=True, nogil=True)
def locate(hist, rank):
    """(bin, rank within the bin, 1-based from the top) of the rank-th largest value counted
    in hist; bin -1 when fewer were counted (selection.locate)."""
    above = 0
    for b in range(len(hist) - 1, -1, -1):
        if above + hist[b] >= rank:
            return b, rank - above
        above += hist[b]
    return -1, rank


@njit(cache=True, nogil=True, inline="always")
def _bits_value(high, low):
    return np.uint32((high << 16) | low).view(np.float32)


def threshold(high: int, low: int) -> float:
    """The fp32 value whose bits are high << 16 | low (the k-th largest found)."""
    return float(np.uint32((high << 16) | low).view(np.float32))


@njit(cache=True, nogil=True, inline="always")
def _merge_chunk(addresses, codes, thresholds, scale, start, n, b, taus, total, count, acc):
    """acc[:n] = TIES of elements [start, start + n), fp32 (see ties_range)."""
    k_count = len(thresholds)
    _widen(addresses[k_count], codes[k_count], start, n, b)
    for i in range(n):
        total[i] = np.float32(0.0)
    for k in range(k_count):
        tau = taus[k]
        _widen(addresses[k], codes[k], start, n, tau)
        t = thresholds[k]
        for i in range(n):
            d = tau[i] - b[i]
            d = np.float32(0.0) if abs(d) < t else d  # masked_fill_(|tau| < t_k, 0)
            tau[i] = d
            total[i] = total[i] + d
    for i in range(n):  # total becomes s (+1 where the sum is >= 0, NaN -> -1 as torch.where)
        total[i] = np.float32(1.0) if total[i] >= np.float32(0.0) else np.float32(-1.0)
        count[i] = np.float32(0.0)
        acc[i] = np.float32(0.0)
    for k in range(k_count):
        tau = taus[k]
        for i in range(n):
            along = tau[i] * total[i]
            count[i] = count[i] + (np.float32(1.0) if along > 0 else np.float32(0.0))
            # clamp_(min=0): -0.0 and NaN stay as they are
            acc[i] = acc[i] + (np.float32(0.0) if along < 0 else along)
    for i in range(n):
        c = count[i] if count[i] >= np.float32(1.0) else np.float32(1.0)
        acc[i] = ((acc[i] * total[i]) / c) * scale + b[i]


@njit(cache=True, nogil=True)
def ties_range(addresses, codes, thresholds, scale, lo, hi):
    """TIES of elements [lo, hi) of one tensor into the output; True when an output value
    is not finite. addresses / codes: the K experts, the base, the output; thresholds: t_k
    as fp32 (0: nothing trimmed, density 1); scale: lambda as fp32.

    ties_elementwise's ops, element by element in its order: tau_k = x_k - theta0, zeroed
    where |tau_k| < t_k; total = ((0 + tau_0) + tau_1) ...; s = +1 where total >= 0 else -1;
    count = sum [s tau_k > 0], agreed = sum max(s tau_k, 0) (from 0, in k order);
    ((agreed * s) / max(count, 1)) * lambda + theta0."""
    k_count = len(thresholds)
    taus = np.empty((k_count, CHUNK), np.float32)
    b = np.empty(CHUNK, np.float32)
    total = np.empty(CHUNK, np.float32)
    count = np.empty(CHUNK, np.float32)
    acc = np.empty(CHUNK, np.float32)
    out = k_count + 1
    bad = False
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        _merge_chunk(addresses, codes, thresholds, scale, start, n, b, taus, total, count, acc)
        bad |= _narrow(acc, n, addresses[out], codes[out], start)
    return bad


@njit(cache=True, nogil=True)
def held_thresholds(addresses, codes, numel, keep, thresholds):
    """thresholds[k] = the keep-th largest |tau_k| over elements [0, numel), all held in
    memory (one unit): pass 1's histogram, then the values in the chosen bin sorted (at most
    numel of them) instead of pass 2's. addresses / codes: the K experts then the base."""
    k_count = len(thresholds)
    high = np.zeros((k_count, HI_BINS), np.int64)
    count_high(addresses, codes, 0, numel, high)
    b = np.empty(CHUNK, np.float32)
    xs = np.empty((k_count, CHUNK), np.float32)
    for k in range(k_count):
        chosen, rank = locate(high[k], keep)
        found = np.empty(high[k, chosen], np.uint32)
        at = 0
        for start in range(0, numel, CHUNK):
            n = min(CHUNK, numel - start)
            bits = _magnitudes(addresses, codes, start, n, b, xs)
            for i in range(n):
                u = bits[k, i] & _MAGNITUDE
                if (u >> np.uint32(16)) == np.uint32(chosen):
                    found[at] = u
                    at += 1
        found.sort()
        thresholds[k] = found[len(found) - rank:len(found) - rank + 1].view(np.float32)[0]


@njit(cache=True, nogil=True)
def ties_whole(addresses, codes, keep, scale, numel):
    """A whole tensor held in the unit's buffers: its thresholds (keep = the k of the trim,
    0: density 1, none), then the merge; True when an output value is not finite."""
    k_count = len(addresses) - 2
    thresholds = np.zeros(k_count, np.float32)
    if keep > 0:
        held_thresholds(addresses[:k_count + 1], codes[:k_count + 1], numel, keep, thresholds)
    return ties_range(addresses, codes, thresholds, scale, 0, numel)


class _Tally:
    """One count's histograms, one per pool thread (each thread adds to its own, no lock
    per unit), summed once the count is done. A thread reuses its array count after count,
    zeroed when a new count first reaches it: a merge's counts run one after another (a
    scan returns only when its units are done, and the plan reads the total before the
    next scan starts)."""

    def __init__(self, local: threading.local, shape: tuple[int, int]) -> None:
        self.local, self.shape = local, shape
        self.arrays: list[np.ndarray] = []
        self.lock = threading.Lock()

    def mine(self) -> np.ndarray:
        slots = self.local.__dict__.setdefault("slots", {})
        owner, array = slots.get(self.shape, (None, None))
        if owner is not self:
            if array is None:
                array = np.zeros(self.shape, np.int64)
            else:
                array.fill(0)
            slots[self.shape] = (self, array)
            with self.lock:
                self.arrays.append(array)
        return array

    def total(self) -> np.ndarray:
        return np.sum(self.arrays, axis=0) if self.arrays else np.zeros(self.shape, np.int64)


Scan = Callable[[Callable[[np.ndarray, int, int], None]], object]


def streamed_thresholds(first: Scan, second: Scan, k_count: int, codes: np.ndarray,
                        keep: int, local: threading.local) -> np.ndarray:
    """Each expert's keep-th largest |tau| over a tensor of many units (fp32, one per
    expert): two scans of its experts and base (first(kernel), second(kernel): the kernel
    on every unit, read or held, on the pool; Merge.scan's or Merge.hold's), pass 1's
    histograms between them."""
    high = _Tally(local, (k_count, HI_BINS))
    first(lambda a, lo, hi: count_high(a[:k_count + 1], codes, lo, hi, high.mine()))
    total = high.total()
    bins, ranks = np.empty(k_count, np.int64), np.empty(k_count, np.int64)
    for k in range(k_count):
        bins[k], ranks[k] = locate(total[k], keep)
    low = _Tally(local, (k_count, LO_BINS))
    second(lambda a, lo, hi: count_low(a[:k_count + 1], codes, lo, hi, bins, low.mine()))
    total = low.total()
    return np.asarray([threshold(int(bins[k]), int(locate(total[k], int(ranks[k]))[0]))
                       for k in range(k_count)], np.float32)


class _Spares:
    """The held tensors' arrays: at most HELD sets in use (`take` waits for a tensor being
    merged to give its set back), and a set given back is reused by the next tensor held: a
    fresh array of tens of MB costs a page fault and the zeroing of each 4 KiB page on first
    touch (7% of the samples of a 1B merge, when every held tensor had new arrays)."""

    def __init__(self) -> None:
        self.free: list[list[np.ndarray]] = []
        self.slots = threading.Semaphore(HELD)

    def take(self, sizes: list[int]) -> list[np.ndarray]:
        """A set of arrays of at least `sizes` bytes each (reused, or new: a smaller set is
        dropped). Waits for a slot: the units of the tensors holding them are all queued
        on the pool before the next plan is made, so a slot comes free."""
        self.slots.acquire()
        while self.free:
            arrays = self.free.pop()
            if all(a.size >= n for a, n in zip(arrays, sizes, strict=True)):
                return arrays
        return [np.empty(n, np.uint8) for n in sizes]

    def give(self, arrays: list[np.ndarray]) -> None:
        """A tensor's set back (all its units merged, or a failure: the slot is freed)."""
        self.free.append(arrays)
        self.slots.release()


def _plan(codes: np.ndarray, thresholds: np.ndarray, scale: np.float32,
          held: list[np.ndarray] | None = None, numel: int = 0,
          done: Callable[[], None] | None = None) -> Plan:
    """The merge of a tensor's units given its thresholds (inputs read by the units, or
    held: the kernel puts their arrays' addresses in, and calls `done` once all `numel`
    elements are merged)."""
    from .fusedmerge import Plan

    if held is None:
        def kernel(addresses: np.ndarray, lo: int, hi: int) -> bool:
            return ties_range(addresses, codes, thresholds, scale, lo, hi)
        return Plan(kernel, reads_base=True)
    inputs = np.array([a.ctypes.data for a in held], np.int64)
    merged, lock = [0], threading.Lock()

    def from_held(addresses: np.ndarray, lo: int, hi: int, held: list = held) -> bool:
        addresses = addresses.copy()  # `held` in the closure keeps the arrays alive
        addresses[:len(inputs)] = inputs
        try:
            return ties_range(addresses, codes, thresholds, scale, lo, hi)
        finally:  # a unit that fails is done too: the set goes back whatever happened
            with lock:
                merged[0] += hi - lo
                last = merged[0] == numel
            if last and done is not None:
                done()
    return Plan(from_held, reads_base=True, held=True)


def prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """fusedmerge's FusedMethod.prepare for TIES: each tensor's plan, its thresholds found
    first: in its one unit's kernel; from the tensor held in memory when it has at most
    HOLD_BLOCKS blocks (read once for the counts and the merge); else by two scans before
    the merge's (each input read three times)."""
    from .fusedmerge import Plan

    density = float(merge.params.density)
    scale = np.float32(merge.params.scale)  # torch rounds the Python scalar to fp32 too
    local = threading.local()  # the pool threads' histograms
    spares = _Spares()

    def plan(t: Tensor) -> Plan:
        numel, codes, inputs = t.base.numel, t.codes(), len(t.experts) + 1
        keep = keep_count(numel, density) if density < 1 else 0
        if keep and numel <= merge.unit_elements:
            def whole(addresses: np.ndarray, lo: int, hi: int) -> bool:
                return ties_whole(addresses, codes, keep, scale, numel)
            return Plan(whole, reads_base=True)
        if not keep:  # density 1: a threshold of 0 trims nothing
            return _plan(codes, np.zeros(inputs - 1, np.float32), scale)
        sizes = [m.nbytes for m in (*t.experts, t.base)]
        if numel > HOLD_BLOCKS * merge.block_elements:
            def scan(kernel: Kernel) -> None:
                merge.scan(t, kernel)
            return _plan(codes, streamed_thresholds(scan, scan, inputs - 1, codes[:inputs],
                                                    keep, local), scale)
        arrays = spares.take(sizes)
        held: list[np.ndarray] = []

        def read(kernel: Kernel) -> None:  # pass 1 as the units are read in
            held.extend(merge.hold(t, arrays, kernel))

        def again(kernel: Kernel) -> None:
            merge.scan(t, kernel, held)
        thresholds = streamed_thresholds(read, again, inputs - 1, codes[:inputs], keep, local)
        return _plan(codes, thresholds, scale, held, numel, lambda: spares.give(arrays))

    return plan


def warm() -> None:
    """Compile (or load from the cache) every specialisation a TIES merge uses."""
    data = np.zeros(64, np.uint8)
    at = data.ctypes.data
    addresses = np.array([at, at + 8, at + 16, at + 32], np.int64)
    codes = np.array([BF16, F16, F32, BF16], np.int64)
    ties_whole(addresses, codes, 1, np.float32(1), 2)
    ties_range(addresses, codes, np.zeros(2, np.float32), np.float32(1), 0, 2)
    count_high(addresses[:3], codes[:3], 0, 2, np.zeros((2, HI_BINS), np.int64))
    count_low(addresses[:3], codes[:3], 0, 2, np.zeros(2, np.int64),
              np.zeros((2, LO_BINS), np.int64))
    locate(np.zeros(4, np.int64), 1)
