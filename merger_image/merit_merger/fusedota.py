"""OTA's merge pass through fused kernels (numba): K experts and their second moments in, the
output dtype out, one pass, no torch.

Per element, as `methods/ota.py` computes it (without FFG masks: with `density`, see
`fusedffg`): w_k = v_k^p + eps, theta = sum_k w_k theta_k / sum_k w_k, and the base where that sum
is 0 (only where the method reads the base: `OtaMerge.uses_base`, an epsilon fp32 cannot hold).

- Rank-1 moments (v = outer(row, col) / total) stay factored: per tensor and expert the row
  factors (row / total)^p and the column factors col^p are computed once (small arrays), and
  an element's weight is row_r^p * col_c^p + eps; the kernel walks a row's columns, so its
  inner loop vectorises.
- Stored moments (1-D tensors', or a `full` file's) are read unit by unit beside the experts
  (the plan's further inputs) and raised to p element by element.

The torch pass's arithmetic in its order: the division by total; outer() is one multiply,
then + eps; the first expert gives num = w * theta, den = w, the next num = fma(w, theta,
num) (torch's vectorised addcmul_ is a fused multiply-add, as add_ with alpha is) and
den += w; then num / den. Bit for bit for p = 1, 2, 3 (torch's shortcuts: a copy, x*x,
x*x*x). Not for p = 0.5: torch's CPU sqrt (this build has USE_MKL=ON: MKL's vector math)
is within an ulp but not correctly rounded (a fifth of random fp32 values an ulp off; fp64
too), where numba's and numpy's sqrt are IEEE's; nor for another p: Sleef's pow in torch,
powf here, each within an ulp. So outputs may differ by an ulp of a weight there (tested:
fp32 to 1e-6 of the largest input, 16-bit outputs to one ulp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numba import carray, njit

from .fused import CHUNK, CODES, _fma, _narrow, _pointer, _widen
from .fusedplan import FusedMethod, Merge, Plan, Tensor
from .io import TensorMeta
from .moments import SEP, MomentReader

TINY32 = float(np.finfo(np.float32).tiny)


@njit(cache=True, nogil=True)
def power(x, n, p, out):
    """out[:n] = x[:n] ** p in fp32 as torch's pow(tensor, p > 0) computes it: its shortcuts
    for 0.5, 1, 2 and 3, else powf (p as fp32, as torch takes it)."""
    if p == 0.5:
        for i in range(n):
            out[i] = np.sqrt(x[i])
    elif p == 1.0:
        for i in range(n):
            out[i] = x[i]
    elif p == 2.0:
        for i in range(n):
            out[i] = x[i] * x[i]
    elif p == 3.0:
        for i in range(n):
            out[i] = x[i] * x[i] * x[i]
    else:
        p32 = np.float32(p)
        for i in range(n):
            out[i] = x[i] ** p32


@njit(cache=True, nogil=True, inline="always")
def _add(k, n, row, col, eps, x, num, den):
    """Expert k into the sums, in the torch pass's order, its weights w = row * col[i] + eps
    made on the way (a stored moment's v^p is col with row 1: the same bits). One loop, so
    that it vectorises with nothing stored between (measured: 0.9 against 0.55 G elements/s
    for a loop making w, then one adding it)."""
    if k == 0:
        for i in range(n):
            w = row * col[i] + eps
            num[i] = w * x[i]
            den[i] = w
    else:
        for i in range(n):
            w = row * col[i] + eps
            num[i] = _fma(w, x[i], num[i])
            den[i] = den[i] + w


@njit(cache=True, nogil=True, inline="always")
def _divide(n, num, den, use_base, address, code, start, b):
    """num[:n] = num / den, or the base where den = 0 (when the merge reads the base)."""
    if use_base:
        _widen(address, code, start, n, b)
        for i in range(n):
            q = num[i] / den[i]
            num[i] = b[i] if den[i] == 0 else q
    else:
        for i in range(n):
            num[i] = num[i] / den[i]


@njit(cache=True, nogil=True, error_model="numpy")  # x / 0 is IEEE's, no raise
def merge_factored(addresses, codes, rows, cols, eps, use_base, lo, hi):
    """Elements [lo, hi) of a tensor with rank-1 moments; True when an output is not finite.

    addresses / codes: the K experts, the base, the output (see `fused.merge_range`).
    rows: fp32 [K, R], (row / total)^p; cols: fp32 [K, C], col^p (both C-contiguous);
    eps: fp32."""
    k_count = len(addresses) - 2
    base, out = k_count, k_count + 1
    n_cols = cols.shape[1]
    num = np.empty(CHUNK, np.float32)
    den = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    bad = False
    start = lo
    while start < hi:  # a piece never crosses a row: one row factor per piece
        r = start // n_cols
        c = start - r * n_cols
        n = min(CHUNK, hi - start, n_cols - c)
        for k in range(k_count):
            _widen(addresses[k], codes[k], start, n, x)
            # the columns as an array from 0 at their address (see fused: it vectorises)
            col = carray(_pointer(cols.ctypes.data + 4 * (k * n_cols + c)), n, np.float32)
            _add(k, n, rows[k, r], col, eps, x, num, den)
        _divide(n, num, den, use_base, addresses[base], codes[base], start, x)
        bad |= _narrow(num, n, addresses[out], codes[out], start)
        start += n
    return bad


@njit(cache=True, nogil=True, error_model="numpy")  # x / 0 is IEEE's, no raise
def merge_stored(addresses, codes, p, eps, use_base, lo, hi):
    """Elements [lo, hi) of a tensor with stored moments; True when an output is not finite.

    addresses / codes: the K experts, the base, the K moments, the output."""
    k_count = (len(addresses) - 2) // 2
    base, out = k_count, len(addresses) - 1
    num = np.empty(CHUNK, np.float32)
    den = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    w = np.empty(CHUNK, np.float32)
    bad = False
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        for k in range(k_count):
            v = base + 1 + k
            _widen(addresses[v], codes[v], start, n, x)
            power(x, n, p, w)
            _widen(addresses[k], codes[k], start, n, x)
            _add(k, n, np.float32(1.0), w, eps, x, num, den)
        _divide(n, num, den, use_base, addresses[base], codes[base], start, x)
        bad |= _narrow(num, n, addresses[out], codes[out], start)
    return bad


def factors(reader: MomentReader, t: Tensor, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(row / total)^p and col^p of one expert's rank-1 moments of t, checked by the reader
    (its errors: a factor missing, misshapen, negative or not finite); zeros where total = 0
    (never had a gradient: v = 0)."""
    reader.check(t.name, t.base.shape)
    f = reader.factor_arrays(t.name)
    reader.drop_cache(t.name)  # read once per tensor; what is kept is made here
    if f.total == 0:
        return np.zeros_like(f.row), np.zeros_like(f.col)
    row = f.row / np.float32(f.total)
    power(row, row.size, p, row)
    col = np.empty_like(f.col)
    power(f.col, col.size, p, col)
    return row, col


def stored_meta(reader: MomentReader, t: Tensor) -> TensorMeta:
    """Where one expert's stored moments of t lie (element for element like t), checked by
    the reader."""
    reader.check(t.name, t.base.shape)
    return reader.file.meta(t.name)


def prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """Each tensor's plan: the factored kernel with its factors, or the stored one."""
    p, readers = float(merge.params.power), list(merge.moments or ())
    eps = np.float32(merge.params.epsilon)  # torch's add_(eps) on fp32 rounds it so
    use_base = merge.params.epsilon < TINY32  # as OtaMerge.uses_base (no density here)

    def plan(t: Tensor) -> Plan:
        if all(r.factored(t.name, t.base.shape) for r in readers):
            made = [factors(r, t, p) for r in readers]
            rows = np.stack([f[0] for f in made])
            cols = np.stack([f[1] for f in made])
            codes = t.codes()

            def factored(addresses: np.ndarray, lo: int, hi: int) -> bool:
                return merge_factored(addresses, codes, rows, cols, eps, use_base, lo, hi)

            return Plan(factored, reads_base=use_base)
        extra = tuple(stored_meta(r, t) for r in readers)
        codes = t.codes(*extra)

        def stored(addresses: np.ndarray, lo: int, hi: int) -> bool:
            return merge_stored(addresses, codes, p, eps, use_base, lo, hi)

        return Plan(stored, reads_base=use_base, extra=extra,
                    counters=tuple(r.file for r in readers), stored_moments=True)

    return plan


def unsupported(params: Any, moments: Sequence[MomentReader] | None) -> str | None:
    """Why this OTA merge takes the torch pass, or None."""
    if not moments:
        return "OTA without second moments"
    if len({r.kind for r in moments}) > 1:  # a tensor's kernel takes one kind for all
        return "second moments of both kinds (rank-1 and full)"
    for reader in moments:
        for key in reader.keys:
            if SEP not in key and reader.file.meta(key).dtype.name not in CODES:
                return f"second moments of {key}: a dtype the fused kernels do not take"
    return None


def warm() -> None:
    """Compile (or load from the cache) the kernels' specialisations a merge uses."""
    data = np.zeros(64, np.uint8)
    at = data.ctypes.data
    codes = np.array([0, 1, 2, 0], np.int64)
    f32 = np.ones(4, np.float32)
    power(f32, 4, 0.5, f32)
    merge_factored(np.array([at, at + 8, at + 16, at + 32], np.int64), codes,
                   np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.float32(1),
                   True, 0, 2)
    merge_stored(np.array([at, at + 8, at + 16, at + 24, at + 32, at + 40], np.int64),
                 np.array([0, 1, 2, 2, 2, 0], np.int64), 0.5, np.float32(1), True, 0, 2)


METHOD = FusedMethod(prepare, unsupported, warm)
