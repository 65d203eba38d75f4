"""Triton kernels of the fused pass on a GPU: one launch per unit, K stored rows in, one out.

The CPU fused kernels' programs (`fused.merge_range`: token-weighted, task arithmetic on
16-bit and on fp32 inputs; `fusedota.merge_factored` / `merge_stored`: OTA without FFG
masks), each element's arithmetic in their order: the inputs widened from their stored bits
(bf16, fp16, fp32), fp32 accumulation with `tl.fma` where they use an fma, IEEE division
and square root (`div_rn`, `sqrt_rn`), then narrowed to the output's dtype by the same bit
operations (round to nearest even; bf16 NaN -> 0x7FC0 as torch), and a flag set when an
output is not finite (the merge refuses it, as on the CPU).

Where the bits are claimed equal: in Triton's interpreter (CPU, numpy; tested against the
numba kernels bit for bit, given an exact fma: the interpreter's own computes a * b + c with
two roundings, see tests/support/triton_interpreter.py). On a GPU the kernels are compiled
with fp contraction off (`enable_fp_fusion=False`: no a * b + c turned into an fma behind
our back; the PTX compiled for sm_90 is checked for that without a GPU: an fma exactly
where `tl.fma` is, `div.rn`, `sqrt.rn`), so the same bits are expected there too, but
nothing here has run on one yet: the device tests hold them to 1e-6 relative, as
`merge.device` promises.

Memory: a unit's inputs lie in one device buffer, input i at byte i * slot (slot >= the
unit's elements times the widest input's itemsize), the output in another; the kernel reads
them through an int16 and an int32 view of each buffer, so no pointer is cast. A unit's
element e of the tensor is its element e - lo; `lo` matters only to rank-1 OTA (the row and
column of an element). No torch here beyond the launches' tensors; no files, no threads
(`gpuunits` does those).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

# Inside the kernels, codes and programs are fused's, written as literals (the branches
# compare constexprs): dtype codes 0, 1, 2 = fused.BF16, F16, F32; programs 0, 1, 2 =
# fused.TOKEN_WEIGHTED, TASK16, TASK32.
POWERS = {0.5: 0, 1.0: 1, 2.0: 2, 3.0: 3}  # OTA's p the stored-moment kernel raises v to
BLOCK = 1024  # elements per program


def pack(codes: Any) -> int:
    """The inputs' dtype codes as one compile-time integer, two bits each."""
    return sum(int(c) << (2 * i) for i, c in enumerate(codes))


@triton.jit
def _widen(src16, src32, slot, i: tl.constexpr, CODES: tl.constexpr, offs, mask):
    """fp32 of input i's elements at offs (its code: bits 2i, 2i + 1 of CODES)."""
    code: tl.constexpr = (CODES >> (2 * i)) & 3
    slot = slot.to(tl.int64)  # i * slot may pass 2^31 (a bench's block of 2^28 elements, K = 8)
    if code == 2:
        x = tl.load(src32 + i * (slot // 4) + offs, mask=mask, other=0).to(tl.float32,
                                                                              bitcast=True)
    else:
        h = tl.load(src16 + i * (slot // 2) + offs, mask=mask, other=0)
        h = h.to(tl.uint16, bitcast=True).to(tl.uint32)
        if code == 0:
            x = (h << 16).to(tl.float32, bitcast=True)
        else:  # fp16 -> fp32 is exact
            x = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return x


@triton.jit
def _half_bits(u):
    """fp16 bits of fp32 bits u (uint32), as `fused._float_to_half`: nearest even,
    overflow to inf, NaN quiet."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    normal = ((a + 0xFFF + ((a >> 13) & 1)) - 0x38000000) >> 13
    m = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum(126 - (a >> 23).to(tl.int32), 1), 31).to(tl.uint32)
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.uint32)
    h = tl.where(a < 0x38800000, q, normal)
    h = tl.where(a < 0x33000000, 0, h)
    h = tl.where(a >= 0x477FF000, 0x7C00, h)
    h = tl.where(a > 0x7F800000, 0x7E00, h)
    return sign | h


@triton.jit
def _narrow(acc, out16, out32, flag, offs, mask, OUT_CODE: tl.constexpr):
    """The output's elements at offs = acc narrowed; flag[0] = 1 when one is not finite
    (|bits| at or above the dtype's limit: it rounds to inf, or is inf or NaN)."""
    u = acc.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    if OUT_CODE == 0:
        o = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        tl.store(out16 + offs, o.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        bad = a >= 0x7F7F8000
    elif OUT_CODE == 1:
        tl.store(out16 + offs, _half_bits(u).to(tl.uint16).to(tl.int16, bitcast=True),
                 mask=mask)
        bad = a >= 0x477FF000
    else:
        tl.store(out32 + offs, u.to(tl.int32, bitcast=True), mask=mask)
        bad = a >= 0x7F800000
    tl.atomic_max(flag, tl.max(tl.where(mask & bad, 1, 0), 0))


@triton.jit
def linear_kernel(src16, src32, out16, out32, flag, params, n, slot, PROGRAM: tl.constexpr,
                  K: tl.constexpr, CODES: tl.constexpr, OUT_CODE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """`fused.merge_range` on n elements: inputs 0..K-1 the experts, input K the base.
    params (fp32): the K weights, then scale, then coefficient (1 - K scale)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(params + K)
    if PROGRAM == 0:  # token-weighted: x_0 w_0, then fma(x_k, w_k, acc)
        acc = _widen(src16, src32, slot, 0, CODES, offs, mask) * tl.load(params)
        for k in tl.static_range(1, K):
            x = _widen(src16, src32, slot, k, CODES, offs, mask)
            acc = tl.fma(x, tl.load(params + k), acc)
    elif PROGRAM == 1:  # task arithmetic, 16-bit: sum, times lambda, fma(base, 1 - K lambda)
        acc = _widen(src16, src32, slot, 0, CODES, offs, mask)
        for k in tl.static_range(1, K):
            acc = acc + _widen(src16, src32, slot, k, CODES, offs, mask)
        acc = acc * scale
        coefficient = tl.load(params + K + 1)
        if coefficient != 0:
            b = _widen(src16, src32, slot, K, CODES, offs, mask)
            acc = tl.fma(b, coefficient, acc)
    else:  # task arithmetic, fp32: ((0 + x_k) - base ...) * lambda + base
        b = _widen(src16, src32, slot, K, CODES, offs, mask)
        acc = (0.0 + _widen(src16, src32, slot, 0, CODES, offs, mask)) - b
        for k in tl.static_range(1, K):
            acc = (acc + _widen(src16, src32, slot, k, CODES, offs, mask)) - b
        acc = acc * scale + b
    _narrow(acc, out16, out32, flag, offs, mask, OUT_CODE)


@triton.jit
def _power(v, P: tl.constexpr):
    """v^p as `fusedota.power` for p = 0.5, 1, 2, 3 (P: POWERS' code)."""
    if P == 0:
        w = tl.sqrt_rn(v)
    elif P == 1:
        w = v
    elif P == 2:
        w = v * v
    else:
        w = v * v * v
    return w


@triton.jit
def ota_kernel(src16, src32, out16, out32, flag, params, rows, cols, n, slot, lo, n_rows,
               n_cols, STORED: tl.constexpr, P: tl.constexpr, USE_BASE: tl.constexpr,
               K: tl.constexpr, CODES: tl.constexpr, OUT_CODE: tl.constexpr,
               BLOCK: tl.constexpr):
    """`fusedota.merge_factored` (rows fp32 [K, n_rows] = (row / total)^p, cols fp32
    [K, n_cols] = col^p) or, STORED, `merge_stored` (the moments are inputs K + 1 ..
    2K); input K the base. params (fp32): eps."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    eps = tl.load(params)
    e = lo + offs  # the tensor's element
    r = e // n_cols
    c = e - r * n_cols
    num = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(K):
        if STORED:
            w = _power(_widen(src16, src32, slot, K + 1 + k, CODES, offs, mask), P) + eps
        else:
            row = tl.load(rows + k * n_rows + r, mask=mask, other=0)
            w = row * tl.load(cols + k * n_cols + c, mask=mask, other=0) + eps
        x = _widen(src16, src32, slot, k, CODES, offs, mask)
        if k == 0:
            num = w * x
            den = w
        else:
            num = tl.fma(w, x, num)
            den = den + w
    q = tl.div_rn(num, den)
    if USE_BASE:
        q = tl.where(den == 0, _widen(src16, src32, slot, K, CODES, offs, mask), q)
    _narrow(q, out16, out32, flag, offs, mask, OUT_CODE)


def _views(src: Any, out: Any) -> tuple[Any, Any, Any, Any]:
    """int16 and int32 views of the input and output buffers (uint8 torch tensors)."""
    import torch

    return src.view(torch.int16), src.view(torch.int32), out.view(torch.int16), \
        out.view(torch.int32)


def launch_linear(src: Any, out: Any, flag: Any, params: Any, *, n: int, slot: int,
                  program: int, k: int, codes: int, out_code: int) -> None:
    """linear_kernel over n elements on the current stream (see the module docstring)."""
    linear_kernel[(triton.cdiv(n, BLOCK),)](
        *_views(src, out), flag, params, n, slot, PROGRAM=program, K=k, CODES=codes,
        OUT_CODE=out_code, BLOCK=BLOCK, **_OPTIONS)


def launch_ota(src: Any, out: Any, flag: Any, params: Any, rows: Any, cols: Any, *, n: int,
               slot: int, lo: int, stored: bool, p: int, use_base: bool, k: int, codes: int,
               out_code: int) -> None:
    """ota_kernel over elements [lo, lo + n) of a tensor with rows x cols elements (stored
    moments: rows = cols = a dummy, the tensor seen as one row)."""
    ota_kernel[(triton.cdiv(n, BLOCK),)](
        *_views(src, out), flag, params, rows, cols, n, slot, lo, rows.shape[-1],
        cols.shape[-1], STORED=stored, P=p, USE_BASE=use_base, K=k, CODES=codes,
        OUT_CODE=out_code, BLOCK=BLOCK, **_OPTIONS)


# compiled: no a * b + c contracted into an fma (the interpreter takes no options)
_OPTIONS: dict[str, Any] = {} if triton.knobs.runtime.interpret else {"enable_fp_fusion": False}
