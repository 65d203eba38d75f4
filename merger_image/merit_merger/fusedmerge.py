"""The merge pass of the linear methods through the fused kernels (`fused`), no torch math.

Token-weighted, uniform and task arithmetic are sums over the inputs of each element. The
torch pass (`engine`) runs one torch op per input and block (a conversion pass, a multiply-
add pass, the cast back, a finiteness pass, each over memory). This pass cuts each tensor
into units of at most `UNIT_ELEMENTS` elements (or the engine's smaller block size), merged
by one thread per core: the unit's thread `pread`s its elements of every input into its own
buffers (reused unit after unit, so they stay in the core's cache), runs the kernel from
them into an output buffer and `pwrite`s it to its place in the output shard.

Why copies and not mappings: mapping the inputs (and the output, shared) cost more kernel
time than copying them. Measured on the 1B-parameter benchmark (K = 4, bf16, page cache):
7.6 s of system time mapping, populating and dropping 10 GB of pages (a page-table entry
per 4 KiB page, and a TLB shootdown on the other core for every range dropped), against
about 1.5 s for `pread`/`pwrite` of the same bytes; and the kernel maps a large page-cache
folio (up to 2 MiB) whole, so mapped ranges grew the resident set by 2 MiB per input and
thread whatever the range.

Same bits as the torch pass (the kernels follow its arithmetic, tested bit for bit), the
same refusal of a non-finite output, the same output files. `unsupported` says why a merge
takes the torch pass instead: another method, a GPU, LoRA partitions, inputs read from
storage, a dtype the kernels do not take, or a merge pass that also scans the update norms.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import DTYPE_NAMES, ModelReader, TensorMeta, open_regular, pread_into
from .methods import normalized
from .remote import remote_file
from .writer import ShardedWriter, pwrite_all

try:  # the merger's extra installs numba; without it every merge takes the torch pass
    from . import fused

    _NO_KERNELS = ""
except Exception as e:  # noqa: BLE001 - numba missing, or no cache dir it can write
    fused = None  # type: ignore[assignment]
    _NO_KERNELS = f"the fused kernels are unavailable ({type(e).__name__}: {str(e)[:120]})"

PROGRAMS = {"token-weighted", "uniform", "task-arithmetic"}
# elements per unit at most: 512 KiB per bf16 input, so a unit's buffers stay near the core
# (1B parameters, K = 4: 1.9 s of system time at 2^18 against 4-6 s at 2^20, load 4-5)
UNIT_ELEMENTS = 1 << 18


def unsupported(method: str, base: ModelReader, experts: Sequence[ModelReader | None], *,
                device: str, observing: bool, output_dtype: Any) -> str | None:
    """Why this merge cannot take the fused path, or None when it can."""
    if fused is None:
        return _NO_KERNELS
    if method not in PROGRAMS:
        return f"{method} has no fused kernel"
    if device != "cpu":
        return f"the merge runs on {device}"
    if observing:
        return "the merge pass also scans the update norms (streamed inputs)"
    if any(e is None for e in experts):
        return "a LoRA partition"
    for name in base.names:
        meta = base.meta(name)
        metas = [meta, *(e.meta(name) if name in e else None for e in experts)]
        if any(m is None or m.shape != meta.shape for m in metas):
            return f"tensor {name} differs between the inputs"
        if any(remote_file(m.path) is not None for m in metas):
            return "inputs are read from storage"
        if not meta.dtype.is_floating_point:
            continue
        dtypes = [m.dtype for m in metas] + [output_dtype or meta.dtype]
        if any(DTYPE_NAMES.get(d) not in fused.CODES for d in dtypes):
            return f"tensor {name}: a dtype the fused kernels do not take"
    return None


@dataclass(frozen=True)
class _Unit:
    """Elements [lo, hi) of one tensor, and everything the kernel needs for them."""

    name: str
    program: int
    lo: int
    hi: int
    # experts, base, output: (fd, file offset of the tensor's element 0, itemsize); the
    # base's itemsize is 0 where the program does not read it
    places: tuple[tuple[int, int, int], ...]
    paths: tuple[Path, ...]  # of the inputs, for errors
    codes: np.ndarray  # their dtypes (fused.CODES)
    weights: np.ndarray  # fp32, one per expert
    scale: np.float32
    coefficient: np.float32
    last: bool = False  # the tensor's last unit


class _Files:
    """Input files opened once each (no symlink followed, regular files only)."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def place(self, meta: TensorMeta) -> tuple[int, int, int]:
        fd = self.fds.get(meta.path)
        if fd is None:
            fd = self.fds[meta.path] = open_regular(meta.path)
        return fd, meta.offset, meta.dtype.itemsize

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def merge_pass(method: str, params: Any, *, base: ModelReader,
               experts: Sequence[ModelReader], weights: Sequence[float], writer: ShardedWriter,
               out_dtypes: dict[str, Any], threads: int, unit_elements: int,
               on_non_finite: Callable[[str], Exception],
               progress: Callable[[int, int], None] | None = None) -> None:
    """Write every output of `writer` at its place (the readers count the bytes read). A
    non-finite output raises on_non_finite(tensor name); the caller aborts the writer."""
    files = _Files()
    pending: deque[tuple[_Unit, Future]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="merge-fused")
    buffers = threading.local()  # each pool thread's own, reused unit after unit
    units = _units(method, params, base, experts, weights, files, writer, out_dtypes,
                   min(unit_elements, UNIT_ELEMENTS))
    try:
        for unit in units:
            if isinstance(unit, str):  # done without the kernel
                writer.filled(unit)
                continue
            pending.append((unit, pool.submit(_run, unit, buffers)))
            while len(pending) > 2 * threads:
                _finish(*pending.popleft(), writer, on_non_finite)
                if progress is not None:
                    progress(writer.bytes_written, writer.total_bytes)
        while pending:
            _finish(*pending.popleft(), writer, on_non_finite)
    finally:
        for _, job in pending:
            job.cancel()
        pool.shutdown(wait=True)  # no unit may write into a file being removed
        files.close()


def _units(method: str, params: Any, base: ModelReader, experts: Sequence[ModelReader],
           weights: Sequence[float], files: _Files, writer: ShardedWriter,
           out_dtypes: dict[str, Any], unit_elements: int) -> Iterator[_Unit | str]:
    """The units of work in tensor order; a tensor done without one (not a float: copied
    as stored here; empty) comes as its name."""
    k = len(experts)
    # as token_weighted() and task_arithmetic() compute them: weights renormalised again
    # (uniform: equal), lambda, 1 - K lambda; all rounded to fp32 as torch's scalars are
    w = np.asarray(normalized([1.0] * k if method == "uniform" else weights), np.float32)
    scale = float(getattr(params, "scale", 1.0))
    coefficient = 1.0 - k * scale
    for name in base.names:
        meta = base.meta(name)
        out_fd, out_offset, nbytes = writer.place(name)
        if not meta.dtype.is_floating_point or meta.numel == 0:  # copied as stored
            raw = np.empty(nbytes, np.uint8)
            fd, offset, _ = files.place(meta)
            pread_into(fd, memoryview(raw), offset, path=meta.path, name=name)
            base.bytes_read += nbytes
            pwrite_all(out_fd, memoryview(raw), out_offset)
            yield name
            continue
        metas = [e.meta(name) for e in experts]
        program = fused.TOKEN_WEIGHTED
        if method == "task-arithmetic":
            small = all(m.dtype.itemsize <= 2 for m in (meta, *metas))
            program = fused.TASK16 if small else fused.TASK32
        reads_base = program != fused.TOKEN_WEIGHTED
        for reader, m in zip([*experts, base] if reads_base else experts, [*metas, meta],
                             strict=False):  # counted as the torch pass counts
            reader.bytes_read += m.nbytes
        base_place = files.place(meta)
        places = (*(files.place(m) for m in metas),
                  base_place if reads_base else (base_place[0], base_place[1], 0),
                  (out_fd, out_offset, nbytes // meta.numel))
        dtypes = [m.dtype for m in metas] + [meta.dtype, out_dtypes[name]]
        common = dict(
            program=program, places=places, paths=tuple(m.path for m in (*metas, meta)),
            codes=np.asarray([fused.CODES[DTYPE_NAMES[d]] for d in dtypes], np.int64),
            weights=w, scale=np.float32(scale), coefficient=np.float32(coefficient))
        for lo in range(0, meta.numel, unit_elements):
            hi = min(lo + unit_elements, meta.numel)
            yield _Unit(name, lo=lo, hi=hi, last=hi == meta.numel, **common)


def _run(unit: _Unit, buffers: threading.local) -> bool:
    """One unit on a pool thread: read its rows, merge, write; True if an output is not
    finite (nothing is written then)."""
    count = unit.hi - unit.lo
    if not hasattr(buffers, "arrays"):
        buffers.arrays = []
    while len(buffers.arrays) < len(unit.places):
        buffers.arrays.append(np.empty(0, np.uint8))
    addresses = np.empty(len(unit.places), np.int64)
    for i, (fd, offset, size) in enumerate(unit.places):
        if buffers.arrays[i].size < count * size:
            buffers.arrays[i] = np.empty(count * size, np.uint8)
        buf = buffers.arrays[i][:count * size]
        if size and i < len(unit.places) - 1:
            pread_into(fd, memoryview(buf), offset + unit.lo * size, path=unit.paths[i],
                       name=unit.name)
        # the kernel indexes elements [lo, hi) from the tensor's element 0
        addresses[i] = buffers.arrays[i].ctypes.data - unit.lo * size
    bad = fused.merge_range(unit.program, addresses, unit.codes, unit.weights, unit.scale,
                            unit.coefficient, unit.lo, unit.hi)
    if not bad:
        fd, offset, size = unit.places[-1]
        pwrite_all(fd, memoryview(buffers.arrays[-1][:count * size]), offset + unit.lo * size)
    return bool(bad)


def _finish(unit: _Unit, job: Future, writer: ShardedWriter,
            on_non_finite: Callable[[str], Exception]) -> None:
    """Wait for a unit; after a tensor's last unit, mark it filled."""
    if job.result():
        raise on_non_finite(unit.name)
    if unit.last:
        writer.filled(unit.name)
