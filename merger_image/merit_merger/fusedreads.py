"""The reads a method's plan makes of a tensor before its units are merged (`Merge.scan`,
`Merge.hold`, `Merge.spill`; `fusedmerge` binds them to its pool, files and readers).

TIES counts each tensor's trim thresholds and FFG the model's saliency thresholds before the
merge: a scan runs a counting kernel over every unit of a tensor on the pool's threads and
returns when all are done; a tensor read several times may instead be held, read once into
arrays in memory (or, too large for memory and read from storage, on a mapped scratch file).
"""

from __future__ import annotations

import mmap
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .fusedplan import Tensor
from .fusedunits import Files, Kernel, Unit, read_all, run
from .io import ModelReader


def wait(jobs: list[Future], seconds: dict[str, float], started: float) -> None:
    """Every job's result (the first error raised, the rest cancelled); the wall time since
    `started` adds to seconds["prepass"]."""
    try:
        for job in jobs:
            job.result()
    finally:
        for job in jobs:
            job.cancel()
    seconds["prepass"] = seconds.get("prepass", 0.0) + time.monotonic() - started


def scan(pool: ThreadPoolExecutor, buffers: threading.local, t: Tensor, kernel: Kernel,
          files: Files, readers: Sequence[ModelReader], unit_elements: int,
          seconds: dict[str, float], held: list[np.ndarray] | None,
          fetch: ThreadPoolExecutor | None = None, extra: tuple[Any, ...] = ()) -> None:
    """Merge.scan: the tensor's experts, base and `extra` inputs (read by `readers`, or
    `held`), unit by unit on the pool (after the units already queued), waited for."""
    started, numel = time.monotonic(), t.base.numel
    spans = [(lo, min(lo + unit_elements, numel)) for lo in range(0, numel, unit_elements)]
    if held is not None:
        addresses = np.array([a.ctypes.data for a in held], np.int64)
        return wait([pool.submit(kernel, addresses, lo, hi) for lo, hi in spans], seconds,
                     started)
    metas = (*t.experts, t.base, *extra)
    for reader, m in zip(readers, metas, strict=True):
        reader.bytes_read += m.nbytes
    places = (*(files.place(m) for m in metas), (-1, 0, 0))  # no output
    paths = tuple(m.path for m in metas)
    wait([pool.submit(run, Unit(t.name, kernel, lo, hi, places, paths, writes=False,
                                            fetch=fetch), buffers)
           for lo, hi in spans], seconds, started)


def hold(pool: ThreadPoolExecutor, t: Tensor, files: Files, readers: Sequence[ModelReader],
          unit_elements: int, seconds: dict[str, float], into: list[np.ndarray] | None,
          kernel: Kernel | None, fetch: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    """Merge.hold: the tensor's experts and base, each read whole (bytes as stored) by units
    of the pool straight into its array, each unit then given to `kernel` while it is in
    the thread's cache."""
    started, metas, numel = time.monotonic(), (*t.experts, t.base), t.base.numel
    arrays = ([a[:m.nbytes] for a, m in zip(into, metas, strict=True)] if into is not None
              else [np.empty(m.nbytes, np.uint8) for m in metas])
    addresses = np.array([a.ctypes.data for a in arrays], np.int64)
    places = [files.place(m) for m in metas]
    for reader, m in zip(readers, metas, strict=True):
        reader.bytes_read += m.nbytes

    def unit(lo: int, hi: int) -> None:
        read_all([(source, memoryview(array[lo * size:hi * size]), offset + lo * size, m.path)
                  for (source, offset, size), m, array in zip(places, metas, arrays,
                                                              strict=True)], t.name, fetch)
        if kernel is not None:
            kernel(addresses, lo, hi)
    wait([pool.submit(unit, lo, min(lo + unit_elements, numel))
           for lo in range(0, numel, unit_elements)], seconds, started)
    return arrays


def spill(scratch: Path, sizes: list[int]) -> list[np.ndarray]:
    """Merge.spill: arrays of `sizes` bytes on one unnamed file in `scratch`, mapped (its
    pages go to disk, not to the process's memory); the file is gone when its arrays are."""
    total = max(1, sum(sizes))
    with tempfile.TemporaryFile(dir=scratch) as f:
        f.truncate(total)
        whole = np.frombuffer(mmap.mmap(f.fileno(), total), np.uint8)  # holds its own fd
    starts = np.cumsum([0, *sizes])
    return [whole[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
