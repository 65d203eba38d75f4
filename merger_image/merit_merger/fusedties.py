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
- `ties_whole`: a tensor that fits in one unit: its thresholds (pass 1, then the chosen
  bin's values sorted) and the merge from the unit's buffers, so it is read once.

Compiled like `fused` (numba's on-disk cache; `warm()` fills it). It knows no files:
`fusedtiesplan` decides per tensor how its thresholds are found, `fusedmerge` reads the
units and runs them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fused import BF16, CHUNK, F16, F32, _narrow, _widen

HI_BINS = 1 << 15  # the high 16 bits of |tau|: the sign bit is 0 (selection.HI_BINS)
LO_BINS = 1 << 16
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


@njit(cache=True, nogil=True, inline="always")
def count_chosen(u, n, chosen, marks, words, h):
    """Into h, the low 16 bits of the |values| among u[:n] (fp32 bits) whose high 16 bits are
    `chosen`: marked in a vectorised loop, then only the 8-element words with a mark looked
    into. marks: CHUNK bytes; words: the same bytes as uint64."""
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
            count_chosen(bits[k], n, np.uint32(bins[k]), marks, words, hist[k])


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
