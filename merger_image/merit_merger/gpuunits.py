"""The fused pass's units on a GPU: each pool thread copies, merges and copies back.

With `merge.device: cuda` the fused pass (`fusedmerge`) runs as on the CPU (units read by the
pool's threads into their own reused host buffers, written by them to the output shard);
only each unit's kernel differs: it copies the unit's inputs from the thread's host
buffers to the thread's device buffers on the thread's own CUDA stream (asynchronously: the
host buffers are pinned, `host_buffer`), launches the Triton kernel (`gpukernels`), copies
the output back and waits for that stream (releasing the GIL). So while one thread waits on
its copies, the others read, copy or launch: reading, copying and the math overlap.

Kernels exist for the linear family and for OTA without FFG masks at p = 0.5, 1, 2, 3;
`unsupported` names what else keeps the torch pass on a GPU (FFG masks, TIES, DARE; LoRA,
like every fused merge). The per-tensor constants are the CPU plans' (`fusedota`'s factors,
`fusedlinear`'s weights), uploaded once per tensor. Units of up to 2M elements
(`fusedmerge`): fewer launches, each moving megabytes.

`DEVICE` is where the kernels run: "cuda", or for tests on a machine without a GPU "cpu",
which needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); there the
launches take a lock, since the interpreter patches triton's module state while it runs.
Imports torch and triton: only a merge on a GPU imports this module.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from . import fused, fusedota
from .fusedplan import Merge, Plan, Tensor
from .fusedunits import Kernel

DEVICE = "cuda"
LINEAR = ("token-weighted", "uniform", "task-arithmetic")
_ALIGN = 256  # bytes: each input's slot in the device buffer starts on this
_local = threading.local()
_interpreting = threading.Lock()


def unsupported(method: str, params: Any) -> str | None:
    """Why this merge cannot take the fused pass on the GPU (then it takes the torch pass
    there), or None."""
    if method not in (*LINEAR, "ota"):
        return f"{method} has no GPU kernel"
    if method == "ota" and params.density is not None:
        return "OTA with FFG masks (density) has no GPU kernel"
    if method == "ota" and float(params.power) not in _powers():
        return f"OTA power {params.power}: the GPU kernels take {sorted(_powers())}"
    try:
        from . import gpukernels
    except Exception as e:  # noqa: BLE001 - triton missing (the CPU wheels) or broken
        return f"triton is not importable ({type(e).__name__}: {str(e)[:120]})"
    if DEVICE == "cpu":
        interpreted = gpukernels.triton.knobs.runtime.interpret
        return None if interpreted else (
            "GPU kernels on the CPU need Triton's interpreter (TRITON_INTERPRET=1)")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler for triton's launcher (gcc, clang or CC)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _powers() -> tuple[float, ...]:
    return (0.5, 1.0, 2.0, 3.0)  # gpukernels.POWERS, without importing triton


def host_buffer(nbytes: int) -> np.ndarray:
    """A pool thread's host buffer: pinned on a GPU (asynchronous copies), else plain. The
    pinned tensor is remembered by its address (while the array lives), so the copies use
    it as torch allocated it (its pinned-memory bookkeeping), not a view made from the
    address."""
    if DEVICE == "cpu":
        return np.empty(nbytes, np.uint8)
    array = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    _pinned().__setitem__(array.ctypes.data, array.base)  # the tensor the array keeps alive
    return array


def _pinned() -> weakref.WeakValueDictionary:
    """This thread's pinned host buffers by address (a thread allocates and uses its own)."""
    if not hasattr(_local, "pinned"):
        _local.pinned = weakref.WeakValueDictionary()
    return _local.pinned


def _host(address: int, nbytes: int) -> torch.Tensor:
    """The host bytes at address as a uint8 tensor (no copy; kept alive by the caller)."""
    pinned = _pinned().get(address)
    if pinned is not None and pinned.numel() >= nbytes:
        return pinned[:nbytes]
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


class _Device:
    """A pool thread's stream and device buffers, grown as needed and reused; made and used
    on that stream only (so no allocation's fill or reuse races another stream's work)."""

    def __init__(self) -> None:
        self.device = torch.device(DEVICE)
        self.stream = torch.cuda.Stream() if DEVICE == "cuda" else None
        with torch.cuda.stream(self.stream):  # None: no-op (the interpreter's CPU tensors)
            self.src = torch.empty(0, dtype=torch.uint8, device=self.device)
            self.out = torch.empty(0, dtype=torch.uint8, device=self.device)
            self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.bad = torch.zeros(1, dtype=torch.int32, pin_memory=DEVICE == "cuda")

    def buffers(self, src_bytes: int, out_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.src.numel() < src_bytes:
            self.src = torch.empty(src_bytes, dtype=torch.uint8, device=self.device)
        if self.out.numel() < out_bytes:
            self.out = torch.empty(out_bytes, dtype=torch.uint8, device=self.device)
        return self.src, self.out


def _state() -> _Device:
    if getattr(_local, "device", None) is None or _local.device.device.type != DEVICE:
        _local.device = _Device()
    return _local.device


def _unit_kernel(sizes: Sequence[int], reads: Sequence[int],
                 launch: Callable[..., None]) -> Kernel:
    """The Kernel of one tensor's units: sizes: itemsize of each input, then the output's;
    reads: the inputs copied (not the base where the plan does not read it);
    launch(src, out, flag, n=, slot=, lo=) runs the Triton kernel."""
    widest, out_size = max(sizes[:-1]), sizes[-1]

    def kernel(addresses: np.ndarray, lo: int, hi: int) -> bool:
        n, state = hi - lo, _state()
        slot = -(-n * widest // _ALIGN) * _ALIGN
        with torch.cuda.stream(state.stream):
            src, out = state.buffers(slot * (len(sizes) - 1), n * out_size)
            for i in reads:  # addresses: where element 0 would lie (see fusedunits.Kernel)
                nbytes = n * sizes[i]
                src[i * slot:i * slot + nbytes].copy_(
                    _host(int(addresses[i]) + lo * sizes[i], nbytes), non_blocking=True)
            state.flag.zero_()
            with _interpreting if DEVICE == "cpu" else nullcontext():
                launch(src, out, state.flag, n=n, slot=slot, lo=lo)
            _host(int(addresses[-1]) + lo * out_size, n * out_size).copy_(
                out[:n * out_size], non_blocking=True)
            state.bad.copy_(state.flag, non_blocking=True)
        if state.stream is not None:
            state.stream.synchronize()  # releases the GIL: the other threads go on
        return bool(state.bad[0])

    return kernel


def _upload(array: np.ndarray) -> torch.Tensor:
    """A small fp32 array (weights, factors) on the device, once per tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(DEVICE)


def linear(merge: Merge, weights: np.ndarray, scale: np.float32, coefficient: np.float32,
           program_of: Callable[[Tensor], int]) -> Callable[[Tensor], Plan]:
    """Each tensor's plan for token-weighted, uniform and task arithmetic: `fusedmerge`'s
    weights and program, gpukernels.linear_kernel."""
    from . import gpukernels

    params = _upload(np.concatenate([weights, [scale, coefficient]]))

    def plan(t: Tensor) -> Plan:
        program, codes = program_of(t), t.codes()
        reads_base = program != fused.TOKEN_WEIGHTED

        def launch(src: torch.Tensor, out: torch.Tensor, flag: torch.Tensor, *, n: int,
                   slot: int, lo: int) -> None:
            gpukernels.launch_linear(src, out, flag, params, n=n, slot=slot, program=program,
                                     k=merge.k, codes=gpukernels.pack(codes[:-1]),
                                     out_code=int(codes[-1]))

        return Plan(_unit_kernel(_sizes(t), _reads(merge.k, reads_base), launch),
                    reads_base=reads_base, alloc=host_buffer)

    return plan


def ota(merge: Merge) -> Callable[[Tensor], Plan]:
    """Each tensor's plan for OTA without FFG masks: `fusedota`'s factors (rank-1) or its
    stored moments, gpukernels.ota_kernel."""
    from . import gpukernels

    p, readers, k = float(merge.params.power), list(merge.moments or ()), merge.k
    eps = np.float32(merge.params.epsilon)
    use_base = merge.params.epsilon < fusedota.TINY32  # as fusedota.prepare
    params = _upload(np.array([eps]))

    def plan(t: Tensor) -> Plan:
        factored = all(r.factored(t.name, t.base.shape) for r in readers)
        extra = () if factored else tuple(fusedota.stored_meta(r, t) for r in readers)
        if factored:
            factors = [fusedota.factors(r, t, p) for r in readers]
            rows, cols = _upload(np.stack([f[0] for f in factors])), _upload(
                np.stack([f[1] for f in factors]))
        else:
            rows = cols = _upload(np.ones(1))
        codes = t.codes(*extra)

        def launch(src: torch.Tensor, out: torch.Tensor, flag: torch.Tensor, *, n: int,
                   slot: int, lo: int) -> None:
            gpukernels.launch_ota(src, out, flag, params, rows, cols, n=n, slot=slot, lo=lo,
                                  stored=not factored, p=gpukernels.POWERS[p],
                                  use_base=use_base, k=k, codes=gpukernels.pack(codes[:-1]),
                                  out_code=int(codes[-1]))

        reads = (*_reads(k, use_base), *range(k + 1, 2 * k + 1)[:len(extra)])
        return Plan(_unit_kernel(_sizes(t, *extra), reads, launch), reads_base=use_base,
                    extra=extra, counters=tuple(r.file for r in readers)[:len(extra)],
                    stored_moments=not factored, alloc=host_buffer)

    return plan


def _sizes(t: Tensor, *extra: Any) -> list[int]:
    """Itemsizes of the experts, the base, `extra`, then the output."""
    return [m.dtype.itemsize for m in (*t.experts, t.base, *extra)] + [t.out_dtype.itemsize]


def _reads(k: int, reads_base: bool) -> tuple[int, ...]:
    return (*range(k), *((k,) if reads_base else ()))
