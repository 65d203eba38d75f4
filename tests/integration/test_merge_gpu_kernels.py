"""The GPU's Triton kernels (`gpukernels`) against the CPU's numba kernels, element by element.

Without a GPU they run in Triton's interpreter and must give the numba kernels' bits exactly
(bf16, fp16, fp32, mixed dtypes, element counts that leave a tail of a block); on a GPU they
run compiled and are held to 1e-6 of the largest input (the device tests' bound: see
`gpukernels` on what is claimed where). Sizes are small: the interpreter runs numpy per op.
Without a GPU, what a GPU would run is still checked: the kernels compiled for sm_90 (PTX
and ptxas, in a process that does not interpret) have an fma exactly where they call
tl.fma and IEEE division and square root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.triton_interpreter import interpret

INTERPRETED = interpret()  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from merit_merger import fused, fusedota, gpukernels  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
N = 2500  # 3 blocks of 1024, the last one partly masked
CODE = {torch.bfloat16: fused.BF16, torch.float16: fused.F16, torch.float32: fused.F32}
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def inputs(dtypes: list[torch.dtype], n: int = N, *, seed: int = 0) -> list[np.ndarray]:
    """Raw bytes of n values per dtype: base-like values, perturbed per input, some tiny
    (fp16 subnormals once narrowed), some large."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    base[:40] *= 1e-4
    base[40:60] *= 1e4
    return [(base + 0.01 * torch.randn(n, generator=g)).to(d).view(torch.uint8).numpy()
            .copy() for d in dtypes]


def on_cpu(kernel, raws: list[np.ndarray], out_dtype: torch.dtype, n: int = N):
    """(output bytes, not finite) of a numba kernel: kernel(addresses, codes)."""
    out = np.zeros(n * torch.empty(0, dtype=out_dtype).element_size(), np.uint8)
    addresses = np.array([a.ctypes.data for a in (*raws, out)], np.int64)
    bad = kernel(addresses)
    return out, bool(bad)


def on_device(launch, raws: list[np.ndarray], out_dtype: torch.dtype, n: int = N):
    """(output bytes, not finite) of a Triton kernel: launch(src, out, flag, slot)."""
    slot = -(-n * 4 // 256) * 256
    src = torch.zeros(slot * len(raws), dtype=torch.uint8)
    for i, raw in enumerate(raws):
        src[i * slot:i * slot + raw.size] = torch.from_numpy(raw)
    out = torch.zeros(n * torch.empty(0, dtype=out_dtype).element_size(), dtype=torch.uint8)
    src, out = src.to(DEVICE), out.to(DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    launch(src, out, flag, slot)
    return out.cpu().numpy(), bool(flag.item())


def assert_same(got: np.ndarray, want: np.ndarray, dtype: torch.dtype, scale: float) -> None:
    if INTERPRETED:
        assert np.array_equal(got, want), f"{int((got != want).sum())} bytes differ"
        return
    a = torch.from_numpy(got).view(dtype).double()
    b = torch.from_numpy(want).view(dtype).double()
    ulp = 1e-6 if dtype == F32 else (2 ** -7 if dtype == BF16 else 2 ** -10)
    assert ((a - b).abs() <= ulp * torch.maximum(b.abs(), torch.tensor(scale))).all()


def linear(program: int, dtypes: list[torch.dtype], out_dtype: torch.dtype, weights,
           scale: float = 0.3, n: int = N, raws=None):
    """(device, cpu) results of one linear program; dtypes: the experts', then the base's."""
    raws = inputs(dtypes, n) if raws is None else raws
    k = len(dtypes) - 1
    w = np.asarray(weights, np.float32)
    scale32, coefficient = np.float32(scale), np.float32(1 - k * scale)
    codes = np.array([CODE[d] for d in (*dtypes, out_dtype)], np.int64)
    want = on_cpu(lambda a: fused.merge_range(program, a, codes, w, scale32, coefficient,
                                              0, n), raws, out_dtype, n)
    params = torch.from_numpy(np.concatenate([w, [scale32, coefficient]])).to(DEVICE)
    got = on_device(lambda src, out, flag, slot: gpukernels.launch_linear(
        src, out, flag, params, n=n, slot=slot, program=program, k=k,
        codes=gpukernels.pack(codes[:-1]), out_code=int(codes[-1])), raws, out_dtype, n)
    return got, want


@pytest.mark.parametrize("dtypes,out", [
    ([BF16] * 4, BF16), ([F16] * 4, F16), ([F32] * 4, F32), ([BF16, F16, F32, F32], BF16),
    ([F32, BF16, BF16, BF16], F16),
])
@pytest.mark.parametrize("program", [fused.TOKEN_WEIGHTED, fused.TASK16, fused.TASK32])
def test_linear_kernel_equals_the_cpu_kernel(dtypes, out, program):
    (got, bad), (want, cpu_bad) = linear(program, dtypes, out, [0.5, 0.2, 0.3])
    assert (bad, cpu_bad) == (False, False)
    assert_same(got, want, out, 0.02)


def test_a_swapped_weight_or_a_wrong_scale_is_caught():
    """The comparison sees a kernel that is wrong: other weights give other bytes."""
    raws = inputs([BF16] * 4)
    (got, _), _ = linear(fused.TOKEN_WEIGHTED, [BF16] * 4, BF16, [0.5, 0.2, 0.3], raws=raws)
    _, (swapped, _) = linear(fused.TOKEN_WEIGHTED, [BF16] * 4, BF16, [0.2, 0.5, 0.3],
                             raws=raws)
    assert not np.array_equal(got, swapped)
    (got, _), _ = linear(fused.TASK16, [BF16] * 4, BF16, [1, 1, 1], scale=0.3, raws=raws)
    _, (other, _) = linear(fused.TASK16, [BF16] * 4, BF16, [1, 1, 1], scale=0.31, raws=raws)
    assert not np.array_equal(got, other)


@pytest.mark.parametrize("out", [BF16, F16, F32])
def test_a_non_finite_output_is_flagged_as_on_the_cpu(out):
    """Two experts' large values in the tail block: 0.9 v + 0.9 v overflows the output
    dtype (fp16: 7e4; bf16 and fp32: 3e38), 0.1 v + 0 does not."""
    raws = inputs([F32] * 3, 1030)
    big = 7e4 if out == F16 else 3e38
    raws[0].view(np.float32)[1029] = raws[1].view(np.float32)[1029] = big
    (_, bad), (_, cpu_bad) = linear(fused.TOKEN_WEIGHTED, [F32] * 3, out, [0.9, 0.9],
                                    n=1030, raws=raws)
    assert bad and cpu_bad
    raws[1].view(np.float32)[1029] = 0
    (got, bad), (want, cpu_bad) = linear(fused.TOKEN_WEIGHTED, [F32] * 3, out, [0.1, 0.9],
                                         n=1030, raws=raws)
    assert not bad and not cpu_bad
    assert_same(got, want, out, big)


def ota(dtypes: list[torch.dtype], out_dtype: torch.dtype, *, stored: bool, power: float,
        eps: float, rows: int = 50, cols: int = 47, lo: int = 0):
    """(device, cpu) results of OTA on elements [lo, rows x cols) of a rows x cols tensor
    (a unit that starts mid-row); dtypes: experts', base's; stored moments in fp32 (and one
    in bf16) after them."""
    n, k = rows * cols, len(dtypes) - 1
    raws = inputs(dtypes, n)
    g = torch.Generator().manual_seed(1)
    eps32, use_base = np.float32(eps), eps < fusedota.TINY32
    if stored:
        moments = [torch.exp(torch.randn(n, generator=g) * 2 - 12) for _ in range(k)]
        for m in moments:  # a row no expert weighs: the base there (eps = 0)
            m[10 * cols:11 * cols] = 0
        mdt = [F32] * (k - 1) + [BF16]
        raws += [m.to(d).view(torch.uint8).numpy().copy() for m, d in zip(moments, mdt,
                                                                            strict=True)]
        codes = np.array([CODE[d] for d in (*dtypes, *mdt, out_dtype)], np.int64)
        want = on_cpu(lambda a: fusedota.merge_stored(a, codes, power, eps32, use_base, lo,
                                                      n), raws, out_dtype, n)
        r = c = torch.ones(1, device=DEVICE)
    else:
        mdt = []
        r_np = np.exp(np.random.default_rng(2).standard_normal((k, rows)) - 6).astype(np.float32)
        c_np = np.exp(np.random.default_rng(3).standard_normal((k, cols)) - 6).astype(np.float32)
        r_np[:, 10] = 0  # a row no expert weighs (elements 470-516)
        codes = np.array([CODE[d] for d in (*dtypes, out_dtype)], np.int64)
        want = on_cpu(lambda a: fusedota.merge_factored(a, codes, r_np, c_np, eps32, use_base,
                                                        lo, n), raws, out_dtype, n)
        r, c = torch.from_numpy(r_np).to(DEVICE), torch.from_numpy(c_np).to(DEVICE)
    params = torch.tensor([eps32], device=DEVICE)
    sizes = [torch.empty(0, dtype=d).element_size() for d in (*dtypes, *mdt[:stored * k])]
    unit = [raw[lo * size:] for raw, size in zip(raws, sizes, strict=True)]
    got = on_device(lambda src, out, flag, slot: gpukernels.launch_ota(
        src, out, flag, params, r, c, n=n - lo, slot=slot, lo=lo, stored=stored,
        p=gpukernels.POWERS[power], use_base=use_base, k=k, codes=gpukernels.pack(codes[:-1]),
        out_code=int(codes[-1])), unit, out_dtype, n - lo)
    out_size = torch.empty(0, dtype=out_dtype).element_size()
    return got, (want[0][lo * out_size:], want[1])


@pytest.mark.parametrize("dtypes,out", [([BF16] * 4, BF16), ([F16] * 3, F16),
                                        ([F32] * 3, F32), ([BF16, F16, F32, F32], BF16)])
@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("power,eps,lo", [(0.5, 1e-26, 0), (1.0, 0.0, 200), (2.0, 1e-3, 0),
                                          (3.0, 1e-26, 1000)])
def test_ota_kernels_equal_the_cpu_kernels(dtypes, out, stored, power, eps, lo):
    """Every power the kernels take; epsilon 0: the base where no expert weighs (a row of
    zero moments)."""
    (got, bad), (want, cpu_bad) = ota(dtypes, out, stored=stored, power=power, eps=eps, lo=lo)
    assert (bad, cpu_bad) == (False, False)
    assert_same(got, want, out, 0.02)


def test_the_compiled_kernels_round_as_the_cpu_kernels():
    """What a GPU would run, compiled here for sm_90 (no GPU needed; triton's ptxas): an fma
    exactly where the kernels call tl.fma (a program's K - 1 or one per element; each thread
    holds BLOCK / 128 elements), none contracted from a * b + c (task arithmetic's fp32
    program: none at all; with fp fusion on, the compiler would make some), IEEE division
    and square root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "support.triton_ptx"], env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, check=True)
    got = json.loads(done.stdout)
    per_thread = gpukernels.BLOCK // 128
    for code in (0, 1, 2):
        assert got[f"linear 0 {code}"]["fma"] == 3 * per_thread  # K = 4: x_1..x_3
        assert got[f"linear 1 {code}"]["fma"] == per_thread  # the base's term
        assert got[f"linear 2 {code}"]["fma"] == 0
    assert got["linear 2 fused"]["fma"] > 0  # the check sees a contraction
    for stored in (False, True):
        ota = got[f"ota {stored}"]
        assert ota["fma"] == 3 * per_thread and ota["div_rn"] == per_thread
        assert ota["div_inexact"] == ota["sqrt_approx"] == 0
        assert ota["sqrt_rn"] == (4 * per_thread if stored else 0)
    assert all(v["cubin"] for v in got.values())
