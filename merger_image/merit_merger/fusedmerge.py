"""The merge pass of the linear methods through the fused kernels (`fused`), no torch math.

Token-weighted, uniform and task arithmetic are sums over the inputs of each element. The
torch path (`engine`) maps a block, runs one torch op per input, casts, checks and copies
the result into the page cache with `pwrite`. This path maps every input file and every
output shard once (the outputs shared and writable), and cuts each tensor into units of
`UNIT_ELEMENTS` elements merged by one thread per core: a unit's thread faults its input
pages and output pages in with one `madvise` each, runs the kernel from the inputs' pages
straight into the output's, and drops the pages from the process again (`MADV_DONTNEED`:
the data stays in the page cache, the resident set stays a few units). Measured on the
1B-parameter benchmark it removes the conversions, the output copy and the per-block
mappings that took most of the torch path's time (docs/merging.md, "The fused path").

Same bits as the torch path (the kernels follow its arithmetic, tested bit for bit), the
same refusal of a non-finite output, the same output files. `unsupported` says why a merge
takes the torch path instead: another method, a GPU, LoRA partitions, inputs read from
storage, a dtype the kernels do not take, or a merge pass that also scans the update norms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meritrun.errors import StorageError

from .io import DTYPE_NAMES, ModelReader, TensorMeta, open_regular
from .methods import normalized
from .remote import remote_file
from .writer import ShardedWriter

try:  # the merger's extra installs numba; without it every merge takes the torch path
    from . import fused
except ImportError:  # pragma: no cover - exercised only where numba is missing
    fused = None  # type: ignore[assignment]

UNIT_ELEMENTS = 1 << 20  # per unit of work: 2 MiB of bf16 per input
PROGRAMS = {"token-weighted", "uniform", "task-arithmetic"}
_POPULATE_READ, _POPULATE_WRITE, _DONTNEED = 22, 23, 4  # madvise(2); POPULATE: Linux >= 5.14
_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def unsupported(method: str, base: ModelReader, experts: Sequence[ModelReader | None], *,
                device: str, observing: bool, output_dtype: Any) -> str | None:
    """Why this merge cannot take the fused path, or None when it can."""
    if fused is None:
        return "numba is not installed"
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
    addresses: np.ndarray  # experts, base, output: where element 0 of the tensor lies
    codes: np.ndarray  # their dtypes (fused.CODES)
    itemsizes: tuple[int, ...]  # of the same arrays
    weights: np.ndarray  # fp32, one per expert
    scale: np.float32
    coefficient: np.float32
    last: bool = False  # the tensor's last unit


class _Mapped:
    """Files mapped read-only, shared, once each; their addresses for the kernels."""

    def __init__(self) -> None:
        self.maps: dict[Path, tuple[mmap.mmap, np.ndarray]] = {}

    def address(self, meta: TensorMeta) -> int:
        found = self.maps.get(meta.path)
        if found is None:
            fd = open_regular(meta.path)
            try:
                size = os.fstat(fd).st_size
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            found = self.maps[meta.path] = (mapping, np.frombuffer(mapping, np.uint8))
        if len(found[1]) < meta.offset + meta.nbytes:  # reading past the end: SIGBUS
            raise StorageError(f"{meta.path}: truncated, {meta.name} lies past its end")
        return found[1].ctypes.data + meta.offset

    def close(self) -> None:
        mappings = [m for m, _ in self.maps.values()]
        self.maps.clear()  # drops the arrays: their exports must end before the mappings close
        for mapping in mappings:
            mapping.close()


def merge_pass(method: str, params: Any, *, base: ModelReader,
               experts: Sequence[ModelReader], weights: Sequence[float], writer: ShardedWriter,
               out_dtypes: dict[str, Any], threads: int,
               on_non_finite: Callable[[str], Exception],
               progress: Callable[[int, int], None] | None = None) -> None:
    """Fill every output of `writer` through its mappings (the readers count the bytes
    read). A non-finite output raises on_non_finite(tensor name); the caller aborts the
    writer."""
    inputs, places = _Mapped(), writer.mapped()
    outputs = {m: np.frombuffer(m, np.uint8) for m, _, _ in places.values()}
    pending: deque[tuple[_Unit, Future]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="merge-fused")
    units = _units(method, params, base, experts, weights, inputs, places, outputs, out_dtypes)
    try:
        for unit in units:
            if isinstance(unit, str):  # done without the kernel
                writer.filled(unit)
                continue
            pending.append((unit, pool.submit(_run, unit)))
            while len(pending) > 2 * threads:
                _finish(*pending.popleft(), writer, on_non_finite)
                if progress is not None:
                    progress(writer.bytes_written, writer.total_bytes)
        while pending:
            _finish(*pending.popleft(), writer, on_non_finite)
    finally:
        for _, job in pending:
            job.cancel()
        pool.shutdown(wait=True)  # no kernel may write into a mapping being closed
        units.close()
        inputs.close()
        outputs.clear()
        for mapping in {m for m, _, _ in places.values()}:
            mapping.close()


def _units(method: str, params: Any, base: ModelReader, experts: Sequence[ModelReader],
           weights: Sequence[float], inputs: _Mapped, places: dict, outputs: dict,
           out_dtypes: dict[str, Any]) -> Iterator[_Unit | str]:
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
        mapping, offset, nbytes = places[name]
        out = outputs[mapping]
        if not meta.dtype.is_floating_point or meta.numel == 0:
            out[offset:offset + nbytes] = np.frombuffer(base.read(name).numpy(), np.uint8)
            yield name
            continue
        metas = [e.meta(name) for e in experts]
        program = fused.TOKEN_WEIGHTED
        if method == "task-arithmetic":
            small = all(m.dtype.itemsize <= 2 for m in (meta, *metas))
            program = fused.TASK16 if small else fused.TASK32
        arrays = [*metas, meta]  # the base's slot is not read by token-weighted
        addresses = [inputs.address(m) for m in metas]
        addresses.append(inputs.address(meta) if program != fused.TOKEN_WEIGHTED
                         else addresses[0])
        readers = [*experts, base] if program != fused.TOKEN_WEIGHTED else experts
        for reader, m in zip(readers, arrays, strict=False):  # as the torch pass counts
            reader.bytes_read += m.nbytes
        addresses.append(out.ctypes.data + offset)
        dtypes = [m.dtype for m in arrays] + [out_dtypes[name]]
        common = dict(
            program=program, addresses=np.asarray(addresses, np.int64),
            codes=np.asarray([fused.CODES[DTYPE_NAMES[d]] for d in dtypes], np.int64),
            itemsizes=tuple(d.itemsize for d in dtypes), weights=w,
            scale=np.float32(scale), coefficient=np.float32(coefficient))
        if program == fused.TOKEN_WEIGHTED:  # mark the base's slot unread (no page faults)
            common["itemsizes"] = (*common["itemsizes"][:k], 0, common["itemsizes"][-1])
        for lo in range(0, meta.numel, UNIT_ELEMENTS):
            hi = min(lo + UNIT_ELEMENTS, meta.numel)
            yield _Unit(name, lo=lo, hi=hi, last=hi == meta.numel, **common)


def _run(unit: _Unit) -> bool:
    """One unit on a pool thread: fault its pages in, merge, drop them; True if an output
    is not finite."""
    count = unit.hi - unit.lo
    spans = [(int(a) + unit.lo * size, count * size)
             for a, size in zip(unit.addresses, unit.itemsizes, strict=True) if size]
    for begin, size in spans[:-1]:
        _advise(begin, size, _POPULATE_READ)
    _advise(*spans[-1], _POPULATE_WRITE)
    bad = fused.merge_range(unit.program, unit.addresses, unit.codes, unit.weights,
                            unit.scale, unit.coefficient, unit.lo, unit.hi)
    for begin, size in spans:
        _advise(begin, size, _DONTNEED)
    return bool(bad)


def _advise(begin: int, size: int, advice: int) -> None:
    """madvise over the pages holding [begin, begin + size). Best effort: a kernel without
    MADV_POPULATE_* faults the pages in where the kernel first touches them."""
    start = begin - begin % _PAGE
    _LIBC.madvise(start, begin + size - start, advice)


def _finish(unit: _Unit, job: Future, writer: ShardedWriter,
            on_non_finite: Callable[[str], Exception]) -> None:
    """Wait for a unit; after a tensor's last unit, mark it filled."""
    if job.result():
        raise on_non_finite(unit.name)
    if unit.last:
        writer.filled(unit.name)
