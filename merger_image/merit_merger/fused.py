"""Fused kernels for the linear merges: K stored rows in, the output dtype out, one pass.

The torch path (`methods/token_weighted.py`, `methods/task_arithmetic.py`, run by `engine`)
does one torch op per input and block: a bf16 -> fp32 conversion pass, a multiply-add pass,
the cast back and a finiteness pass, each over memory. Here one compiled loop (numba) reads
the K inputs as stored (bf16, fp16 or fp32 bits), accumulates in fp32 and writes the output
dtype, a cache-sized chunk at a time, and counts the non-finite outputs on the way.

Bit for bit the torch path's arithmetic, in its order (tested against it):
- token-weighted: acc = x_0 * w_0, then acc = fma(x_k, w_k, acc) (torch's vectorised
  `add_(x, alpha=w)` is a fused multiply-add; weights rounded to fp32 as torch does);
- task arithmetic, 16-bit inputs: sum of the x_k, times lambda, then fma(base, 1 - K lambda);
  fp32 inputs: ((0 + x_k) - base ...) * lambda + base;
- narrowing rounds to nearest even (bf16: NaN -> 0x7FC0 as torch; fp16: IEEE).

Compiled once per machine (numba's on-disk cache, `NUMBA_CACHE_DIR`; `warm()` fills it, the
merger image runs it at build time). It knows no files: `fusedmerge` maps them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _writable_cache() -> None:
    """numba uses an on-disk cache only where it can write (it tries a file there first). The
    merger image bakes the compiled kernels into NUMBA_CACHE_DIR at build time; under a
    read-only root filesystem they are copied, once per pod, to the temp dir (the Job's
    work volume), so the first merge loads them instead of compiling for 8 s. Must run
    before numba is imported: numba reads its settings then."""
    baked = os.environ.get("NUMBA_CACHE_DIR")
    if not baked or not os.path.isdir(baked) or os.access(baked, os.W_OK):
        return
    target = Path(tempfile.gettempdir()) / "meritrun-numba-cache"
    shutil.copytree(baked, target, dirs_exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(target)


_writable_cache()

import numpy as np  # noqa: E402
from numba import carray, njit, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

BF16, F16, F32 = 0, 1, 2
CODES = {"BF16": BF16, "F16": F16, "F32": F32}  # safetensors dtype names the kernels take
TOKEN_WEIGHTED, TASK16, TASK32 = 0, 1, 2  # the programs (see the module docstring)
CHUNK = 2048  # elements per step: the fp32 sum and one widened input stay in L1


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma), as torch's vectorised add with alpha."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


# Bit twiddling in int64: numba types uint32 op int64 as float64.
@njit(cache=True, nogil=True, inline="always")
def _bits_float(bits):
    return np.uint32(bits).view(np.float32)


@intrinsic
def _pointer(typingctx, address):
    """The memory at an integer address (kept alive and bounds-checked by the caller)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


@njit(cache=True, nogil=True, inline="always")
def _half_to_float(h):
    h = np.int64(h)
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:  # zero or subnormal: mant * 2^-24 is exact in fp32
        v = np.float32(mant) * np.float32(5.960464477539063e-08)
        return -v if h & 0x8000 else v
    sign = (h & 0x8000) << 16
    if exp == 31:
        return _bits_float(sign | 0x7F800000 | (mant << 13))
    return _bits_float(sign | ((exp + 112) << 23) | (mant << 13))


@njit(cache=True, nogil=True, inline="always")
def _float_to_half(x):
    """Round to nearest even; overflow to +-inf; NaN to a quiet NaN."""
    f = np.int64(np.float32(x).view(np.uint32))
    sign = (f >> 16) & 0x8000
    a = f & 0x7FFFFFFF
    if a >= 0x7F800000:
        return np.uint16(sign | (0x7E00 if a > 0x7F800000 else 0x7C00))
    if a >= 0x477FF000:  # rounds to 65536 or more
        return np.uint16(sign | 0x7C00)
    if a < 0x38800000:  # below the smallest normal half (2^-14): a subnormal half or zero
        if a < 0x33000000:  # under 2^-25: rounds to 0
            return np.uint16(sign)
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - (a >> 23)  # x = m * 2^(e - 150): in units of 2^-24, m >> (126 - e)
        q = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1)):
            q += 1
        return np.uint16(sign | q)
    m = a + 0xFFF + ((a >> 13) & 1)  # round the 13 dropped bits to even
    return np.uint16(sign | ((m - 0x38000000) >> 13))


# The loops index arrays made at the chunk's own address from 0, in unsigned arithmetic:
# an index numba cannot prove non-negative, or a branch in the loop, stops LLVM vectorising
# it (measured: 1.4 against 20 G elements/s widening bf16).
@njit(cache=True, nogil=True, inline="always")
def _widen(address, code, start, n, dst):
    """dst[:n] = fp32 of elements [start, start + n) of the `code` array at address."""
    if code == BF16:
        s = carray(_pointer(address + 2 * start), n, np.uint16)
        for i in range(n):
            dst[i] = _bits_float(np.uint32(s[i]) << 16)
    elif code == F16:
        s = carray(_pointer(address + 2 * start), n, np.uint16)
        for i in range(n):
            dst[i] = _half_to_float(s[i])
    else:
        s = carray(_pointer(address + 4 * start), n, np.float32)
        for i in range(n):
            dst[i] = s[i]


# |x|'s fp32 bits at or above which x is not finite once narrowed (it rounds to inf, or is
# inf or NaN): (bits + (2^31 - limit)) has its top bit set exactly then, so one OR over a
# chunk tells whether any output is (the merge then fails: a NaN's payload never matters).


@njit(cache=True, nogil=True, inline="always")
def _narrow(acc, n, address, code, start):
    """Elements [start, start + n) of the `code` array at address = acc[:n]; True when one
    of them is not finite."""
    bits = acc.view(np.uint32)
    over = np.uint32(0)
    if code == BF16:
        o = carray(_pointer(address + 2 * start), n, np.uint16)
        lift = np.uint32(0x80000000 - 0x7F7F8000)
        for i in range(n):
            u = bits[i]
            o[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                             >> np.uint32(16))
            over |= (u & np.uint32(0x7FFFFFFF)) + lift
    elif code == F16:
        o = carray(_pointer(address + 2 * start), n, np.uint16)
        lift = np.uint32(0x80000000 - 0x477FF000)
        for i in range(n):
            o[i] = _float_to_half(acc[i])
            over |= (bits[i] & np.uint32(0x7FFFFFFF)) + lift
    else:
        o = carray(_pointer(address + 4 * start), n, np.float32)
        lift = np.uint32(0x80000000 - 0x7F800000)
        for i in range(n):
            o[i] = acc[i]
            over |= (bits[i] & np.uint32(0x7FFFFFFF)) + lift
    return (over >> np.uint32(31)) != 0


@njit(cache=True, nogil=True)
def merge_range(program, addresses, codes, weights, scale, coefficient, lo, hi):
    """Merge elements [lo, hi) of one tensor; True when an output value is not finite.

    addresses / codes: where each array starts and its dtype code: the K experts, then the
    base (unused by token-weighted), then the output. weights: fp32, one per expert."""
    k_count = len(addresses) - 2
    base, out = k_count, k_count + 1
    acc = np.empty(CHUNK, np.float32)
    x = np.empty(CHUNK, np.float32)
    b = np.empty(CHUNK, np.float32)
    bad = False
    for start in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - start)
        if program == TOKEN_WEIGHTED:
            _widen(addresses[0], codes[0], start, n, acc)
            for i in range(n):
                acc[i] = acc[i] * weights[0]
            for k in range(1, k_count):
                _widen(addresses[k], codes[k], start, n, x)
                w = weights[k]
                for i in range(n):
                    acc[i] = _fma(x[i], w, acc[i])
        elif program == TASK16:
            _widen(addresses[0], codes[0], start, n, acc)
            for k in range(1, k_count):
                _widen(addresses[k], codes[k], start, n, x)
                for i in range(n):
                    acc[i] = acc[i] + x[i]
            for i in range(n):
                acc[i] = acc[i] * scale
            if coefficient != 0:
                _widen(addresses[base], codes[base], start, n, b)
                for i in range(n):
                    acc[i] = _fma(b[i], coefficient, acc[i])
        else:
            _widen(addresses[base], codes[base], start, n, b)
            for k in range(k_count):
                _widen(addresses[k], codes[k], start, n, x)
                for i in range(n):
                    acc[i] = ((np.float32(0.0) if k == 0 else acc[i]) + x[i]) - b[i]
            for i in range(n):
                acc[i] = acc[i] * scale + b[i]
        bad |= _narrow(acc, n, addresses[out], codes[out], start)
    return bad


def warm() -> None:
    """Compile (or load from the cache) every specialisation a merge uses."""
    data = np.zeros(64, np.uint8)
    at = data.ctypes.data
    for program in (TOKEN_WEIGHTED, TASK16, TASK32):
        merge_range(program, np.array([at, at + 8, at + 16, at + 32], np.int64),
                    np.array([BF16, F16, F32, BF16], np.int64), np.ones(2, np.float32),
                    np.float32(1), np.float32(1), 0, 2)
