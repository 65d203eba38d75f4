"""Compile the GPU merge kernels for a GPU without one: `python -m support.triton_ptx`.

Prints, as JSON, how many of some PTX instructions each variant's compiled code holds (the
kernels built for sm_90 as on an H100/H200, PTX through ptxas to a cubin). Run in a process
where TRITON_INTERPRET is unset (triton decides at its import whether it compiles), so a test
that interprets the kernels can still check what a GPU would run.
"""

from __future__ import annotations

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from merit_merger import gpukernels

BUFFERS = {"src16": "*i16", "src32": "*i32", "out16": "*i16", "out32": "*i32", "flag": "*i32",
           "params": "*fp32"}
LINEAR = ("PROGRAM", "K", "CODES", "OUT_CODE", "BLOCK")
OTA = ("STORED", "P", "USE_BASE", "K", "CODES", "OUT_CODE", "BLOCK")
COUNTED = {"fma": r"\bfma\.rn\.f32", "div_rn": r"\bdiv\.rn\.f32", "div_inexact":
           r"\bdiv\.(full|approx)", "sqrt_rn": r"\bsqrt\.rn\.f32", "sqrt_approx": r"sqrt\.approx"}


def compiled(fn, signature: dict, constexprs: dict, fusion: bool = False) -> dict:
    src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                    constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"enable_fp_fusion": fusion})
    ptx = kernel.asm["ptx"]
    return {"cubin": bool(kernel.asm.get("cubin")),
            **{key: len(re.findall(pattern, ptx)) for key, pattern in COUNTED.items()}}


def main() -> None:
    mixed = gpukernels.pack([0, 1, 2, 2, 0, 2, 0, 1, 2])  # experts, base, moments
    linear_sig = {**BUFFERS, "n": "i32", "slot": "i32"}
    ota_sig = {**BUFFERS, "rows": "*fp32", "cols": "*fp32", "n": "i32", "slot": "i32",
               "lo": "i32", "n_rows": "i32", "n_cols": "i32"}
    out = {}
    for program in (0, 1, 2):
        for code in (0, 1, 2):
            out[f"linear {program} {code}"] = compiled(gpukernels.linear_kernel, linear_sig, dict(
                zip(LINEAR, (program, 4, mixed, code, gpukernels.BLOCK), strict=True)))
    out["linear 2 fused"] = compiled(gpukernels.linear_kernel, linear_sig, dict(
        zip(LINEAR, (2, 4, mixed, 0, gpukernels.BLOCK), strict=True)), fusion=True)
    for stored in (False, True):
        out[f"ota {stored}"] = compiled(gpukernels.ota_kernel, ota_sig, dict(
            zip(OTA, (stored, 0, True, 4, mixed, 1, gpukernels.BLOCK), strict=True)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
