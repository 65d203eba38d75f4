"""OTA with Fast Fisher Grafting masks (`density`) in the fused pass: the model-wide
thresholds, then the masked merge, numba kernels, no torch.

As `methods/ota.py` computes it: s_i = (theta_i - theta0)^2 * v_i (fp32: the difference
squared, then times the dense moment, rank-1 v = (row / total) * col as torch's outer makes
it); t_i = the k-th largest s_i over ALL floating elements of the model, k = keep_count(N,
density); m_i = [s_i >= t_i]; w_i = (v_i^p + eps) * m_i; the merge as `fusedota`'s (num,
den), and theta0 where every expert is masked (sum w = 0).

The thresholds are found before any unit is merged (the torch pass's `ffg_thresholds`
pre-pass, the same exact radix select as `selection.KthLargest` and `fusedties`): two scans
of the whole model (`Merge.scan`, every floating tensor's experts, base and stored moments),
pass 1 counting the high 16 bits of each expert's saliencies into per-thread histograms
(`fusedtiesplan.Tally`), pass 2 the low 16 bits of those in the chosen bin; then the merge.
Each tensor's kept counts and fallbacks go to `Merge.stats` (the report's kept_fraction and
fallback_elements), the thresholds to `Merge.thresholds`.

The saliencies and masks are the torch pass's bit for bit (IEEE ops in its order), so the
thresholds and kept counts are equal; the weights are `fusedota`'s (an ulp apart at p = 0.5:
torch's sqrt is MKL's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from numba import carray, njit

from . import fusedota
from .fused import CHUNK, _fma, _narrow, _pointer, _widen
from .fusedota import power
from .fusedplan import FusedMethod, Merge, Plan, Tensor
from .fusedties import HI_BINS, LO_BINS, count_chosen, locate, threshold
from .fusedtiesplan import Tally
from .methods import keep_count
from .moments import MomentReader

_MAGNITUDE = np.uint32(0x7FFFFFFF)  # abs() of the saliency, as KthLargest takes it


@njit(cache=True, nogil=True, inline="always")
def _span(start, hi, n_cols):
    """Elements of the next piece: at most CHUNK, within one row when factored (n_cols > 0)."""
    n = min(CHUNK, hi - start)
    if n_cols > 0:
        n = min(n, n_cols - start % n_cols)
    return n


@njit(cache=True, nogil=True, inline="always")
def _saliency(addresses, codes, k, vrows, vcols, start, n, b, x, s):
    """x[:n] = expert k's elements [start, start + n), s[:n] = (x - b)^2 * v_k (b: theta0);
    v_k = vrows[k, r] * vcols[k, c] (rank-1), else the stored moments (after the base)."""
    k_count = vrows.shape[0]
    _widen(addresses[k], codes[k], start, n, x)
    n_cols = vcols.shape[1]
    if n_cols > 0:
        r = start // n_cols
        row = vrows[k, r]
        col = carray(_pointer(vcols.ctypes.data + 4 * (k * n_cols + start - r * n_cols)), n,
                     np.float32)
        for i in range(n):
            d = x[i] - b[i]
            s[i] = (d * d) * (row * col[i])
    else:
        v = k_count + 1 + k
        _widen(addresses[v], codes[v], start, n, s)
        for i in range(n):
            d = x[i] - b[i]
            s[i] = (d * d) * s[i]


@njit(cache=True, nogil=True)
def count_saliency(addresses, codes, vrows, vcols, lo, hi, first, bins, hist):
    """Elements [lo, hi) into hist[k]: pass 1 (`first`) the high 16 bits of each |s_k|;
    pass 2 the low 16 bits of those whose high bits are bins[k] (marked by a vectorised
    loop, only the 8-element words with a mark looked into, as `fusedties.count_low`).
    addresses / codes: the experts, the base, the stored moments if any, (an output)."""
    k_count = vrows.shape[0]
    n_cols = vcols.shape[1]
    b = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    s = np.empty(CHUNK, np.float32)
    marks = np.zeros(CHUNK, np.uint8)
    words = marks.view(np.uint64)
    bits = s.view(np.uint32)
    start = lo
    while start < hi:
        n = _span(start, hi, n_cols)
        _widen(addresses[k_count], codes[k_count], start, n, b)
        for k in range(k_count):
            _saliency(addresses, codes, k, vrows, vcols, start, n, b, x, s)
            h = hist[k]
            if first:
                for i in range(n):
                    h[(bits[i] & _MAGNITUDE) >> np.uint32(16)] += 1
                continue
            count_chosen(bits, n, np.uint32(bins[k]), marks, words, h)
        start += n


@njit(cache=True, nogil=True, error_model="numpy")  # x / 0 is IEEE's, no raise
def merge_masked(addresses, codes, vrows, vcols, prows, pcols, p, eps, thresholds, lo, hi,
                 counts):
    """OTA with FFG masks of elements [lo, hi); True when an output is not finite.
    counts[k] += the elements expert k's mask keeps, counts[K] += those where every expert
    is masked (theta0 taken).

    addresses / codes: the experts, the base, the stored moments if any, the output.
    vrows, vcols: rank-1 v's factors (row / total, col; empty for stored moments); prows,
    pcols: their powers ((row / total)^p, col^p); thresholds: t_k (fp32)."""
    k_count = vrows.shape[0]
    n_cols = vcols.shape[1]
    out = len(addresses) - 1
    b = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    s = np.empty(CHUNK, np.float32)
    w = np.empty(CHUNK, np.float32)
    num = np.empty(CHUNK, np.float32)
    den = np.empty(CHUNK, np.float32)
    bad = False
    start = lo
    while start < hi:
        n = _span(start, hi, n_cols)
        _widen(addresses[k_count], codes[k_count], start, n, b)
        for k in range(k_count):
            _saliency(addresses, codes, k, vrows, vcols, start, n, b, x, s)
            if n_cols > 0:  # w = (row^p * col^p + eps), as outer(...).add_(eps)
                r = start // n_cols
                row = prows[k, r]
                col = carray(_pointer(pcols.ctypes.data + 4 * (k * n_cols + start - r * n_cols)),
                             n, np.float32)
                for i in range(n):
                    w[i] = row * col[i] + eps
            else:  # v^p + eps of the stored moments
                v = k_count + 1 + k
                _widen(addresses[v], codes[v], start, n, w)
                power(w, n, p, w)
                for i in range(n):
                    w[i] = w[i] + eps
            t = thresholds[k]
            kept = 0
            for i in range(n):  # w.mul_(s >= t as 1.0 / 0.0), then the sums
                keep = s[i] >= t
                kept += 1 if keep else 0
                wi = w[i] * (np.float32(1.0) if keep else np.float32(0.0))
                if k == 0:
                    num[i] = wi * x[i]
                    den[i] = wi
                else:
                    num[i] = _fma(wi, x[i], num[i])
                    den[i] = den[i] + wi
            counts[k] += kept
        fallback = 0
        for i in range(n):
            q = num[i] / den[i]
            masked = den[i] == 0
            fallback += 1 if masked else 0
            num[i] = b[i] if masked else q
        counts[k_count] += fallback
        bad |= _narrow(num, n, addresses[out], codes[out], start)
        start += n
    return bad


class _Moments:
    """One tensor's second moments as its kernels take them: rank-1 factors (v's and their
    powers) or the stored moments' places (read beside the experts)."""

    def __init__(self, readers: list[MomentReader], t: Tensor, p: float) -> None:
        shape = t.base.shape
        for reader in readers:  # their errors (missing, misshapen, negative, not finite)
            reader.check(t.name, shape)
        self.extra: tuple = ()
        self.counters: tuple = ()
        if all(r.factored(t.name, shape) for r in readers):
            factors = [_rank1(r, t.name) for r in readers]
            self.vrows = np.stack([f[0] for f in factors])
            self.vcols = np.stack([f[1] for f in factors])
            self.prows, self.pcols = np.empty_like(self.vrows), np.empty_like(self.vcols)
            power(self.vrows.ravel(), self.vrows.size, p, self.prows.ravel())
            power(self.vcols.ravel(), self.vcols.size, p, self.pcols.ravel())
        else:
            k = len(readers)
            self.vrows = self.prows = np.zeros((k, 0), np.float32)
            self.vcols = self.pcols = np.zeros((k, 0), np.float32)
            self.extra = tuple(r.file.meta(t.name) for r in readers)
            self.counters = tuple(r.file for r in readers)


def _rank1(reader: MomentReader, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row / total, col) of one expert's rank-1 moments (zeros where total = 0: v = 0)."""
    f = reader.factor_arrays(name)
    reader.drop_cache(name)  # read once; what the merge needs is kept here
    if f.total == 0:
        return np.zeros_like(f.row), np.zeros_like(f.col)
    return f.row / np.float32(f.total), f.col.copy()


def _thresholds(merge: Merge, moments: dict[str, _Moments]) -> np.ndarray:
    """Each expert's keep-th largest saliency over every tensor: two scans of the model."""
    k_count = merge.k
    numel = sum(t.base.numel for t in merge.tensors)
    keep = keep_count(numel, float(merge.params.density))
    local = threading.local()

    def scan(first: bool, bins: np.ndarray, tally: Tally) -> np.ndarray:
        for t in merge.tensors:
            m, codes = moments[t.name], t.codes(*moments[t.name].extra)

            def kernel(a: np.ndarray, lo: int, hi: int, m: _Moments = m,
                       codes: np.ndarray = codes) -> None:
                count_saliency(a, codes, m.vrows, m.vcols, lo, hi, first, bins, tally.mine())
            merge.scan(t, kernel, extra=m.extra, counters=m.counters)
        return tally.total()

    high = scan(True, np.zeros(k_count, np.int64), Tally(local, (k_count, HI_BINS)))
    bins, ranks = np.empty(k_count, np.int64), np.empty(k_count, np.int64)
    for k in range(k_count):
        bins[k], ranks[k] = locate(high[k], keep)
    low = scan(False, bins, Tally(local, (k_count, LO_BINS)))
    return np.asarray([threshold(int(bins[k]), int(locate(low[k], int(ranks[k]))[0]))
                       for k in range(k_count)], np.float32)


def prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """fusedota's prepare with density: the thresholds first (two scans of the model), then
    each tensor's masked merge, its counts added to merge.stats."""
    p, readers = float(merge.params.power), list(merge.moments or ())
    eps = np.float32(merge.params.epsilon)
    for entry in merge.stats.values():
        entry.kept = [0] * merge.k
    moments = {t.name: _Moments(readers, t, p) for t in merge.tensors}
    thresholds = _thresholds(merge, moments) if merge.tensors else np.zeros(merge.k, np.float32)
    merge.thresholds[:] = [float(t) for t in thresholds]
    lock = threading.Lock()

    def plan(t: Tensor) -> Plan:
        m = moments.pop(t.name)
        codes = t.codes(*m.extra)
        stats = merge.stats[t.name]

        def kernel(addresses: np.ndarray, lo: int, hi: int) -> bool:
            counts = np.zeros(merge.k + 1, np.int64)
            bad = merge_masked(addresses, codes, m.vrows, m.vcols, m.prows, m.pcols, p, eps,
                               thresholds, lo, hi, counts)
            with lock:
                stats.kept = [a + int(c) for a, c in zip(stats.kept, counts[:-1],
                                                         strict=True)]
                stats.fallback += int(counts[-1])
            return bad
        return Plan(kernel, reads_base=True, extra=m.extra, counters=m.counters,
                    stored_moments=bool(m.extra))

    return plan



def warm() -> None:
    """Compile (or load from the cache) the kernels' specialisations a merge uses."""
    data = np.zeros(64, np.uint8)
    at = data.ctypes.data
    codes = np.array([0, 1, 2, 0], np.int64)
    addresses = np.array([at, at + 8, at + 16, at + 32], np.int64)
    ones = np.ones((2, 2), np.float32)
    bins = np.zeros(2, np.int64)
    count_saliency(addresses, codes, ones, ones, 0, 2, True, bins, np.zeros((2, HI_BINS),
                                                                           np.int64))
    merge_masked(addresses, codes, ones, ones, ones, ones, 0.5, np.float32(1),
                 np.zeros(2, np.float32), 0, 2, np.zeros(3, np.int64))
    stored = np.array([at, at + 8, at + 16, at + 24, at + 32, at + 40], np.int64)
    none = np.zeros((2, 0), np.float32)
    merge_masked(stored, np.array([0, 1, 2, 2, 2, 0], np.int64), none, none, none, none, 0.5,
                 np.float32(1), np.zeros(2, np.float32), 0, 2, np.zeros(3, np.int64))


def _prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """OTA's plans: with FFG masks here, without them `fusedota`'s."""
    if getattr(merge.params, "density", None) is not None:
        return prepare(merge)
    return fusedota.prepare(merge)


def _warm() -> None:
    fusedota.warm()
    warm()


METHOD = FusedMethod(_prepare, fusedota.unsupported, _warm)
"""OTA in the fused pass, with or without FFG masks."""
