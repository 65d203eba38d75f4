"""Triton's interpreter for the GPU kernels' tests on a machine without a GPU.

Triton decides at its import whether `@triton.jit` compiles or interprets, and some test
modules import it indirectly (transformers), so tests/conftest.py sets TRITON_INTERPRET=1
first where no GPU's device file exists; `interpret()`, called by the GPU path's test
modules at import, checks that choice against torch's view of the GPU and installs the
exact fma, so the same tests run the compiled kernels where there is a GPU.

`exact_fma()`: the interpreter's `tl.fma` computes x * y + z in fp32 with two roundings
(numpy has no fused multiply-add), so a kernel that is right would differ from the CPU's
numba kernels in an ulp here and there. It is replaced by a correctly rounded one: the
product of two fp32 values is exact in fp64, the sum is rounded to odd in fp64 (a TwoSum's
error moves an even result one ulp towards the exact value), and rounding that to fp32 is
then the exact sum rounded once.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def interpret() -> bool:
    """Run triton's kernels in its interpreter unless a GPU is present; True when it does.
    Fails when triton was imported before in compiled mode on a machine without a GPU."""
    import torch

    if torch.cuda.is_available():
        return False
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before its interpreter could be chosen")
    os.environ["TRITON_INTERPRET"] = "1"
    exact_fma()
    return True


def fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x * y + z rounded once to fp32 (x, y, z fp32 arrays or scalars)."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN go through as IEEE's
        p = np.asarray(x, np.float64) * np.asarray(y, np.float64)  # exact
        c = np.asarray(z, np.float64)
        s = p + c
        bp = s - c
        err = (p - bp) + (c - (s - bp))  # s + err = p + c exactly (TwoSum)
        even = (s.view(np.int64) & 1) == 0
        inexact = np.isfinite(s) & (err != 0) & even
        odd = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
        return np.where(inexact, odd, s).astype(np.float32)


def exact_fma() -> None:
    """Install fma32 as the interpreter's tl.fma."""
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)

    interpreter.InterpreterBuilder.create_fma = create_fma
