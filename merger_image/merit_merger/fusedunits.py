"""The units of the fused pass: where their inputs are read from, and one unit's run.

A unit is elements [lo, hi) of one tensor. Its pool thread reads those elements of every
input into its own buffers (reused unit after unit), runs the tensor's kernel from them into
an output buffer and writes that to its place in the output shard (`fusedmerge` makes the
units, queues them and takes their results in order).

An input is a local file, read with `pread` (opened once, no symlink followed), or an object
mounted in its place (`remote`: a streamed merge's inputs in storage), read with ranged GETs
pinned to the version first seen (a changed object is an IntegrityError). This module does no
arithmetic and knows no method.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .header import TensorMeta, open_regular
from .io import pread_into
from .remote import RemoteFile, remote_file
from .writer import pwrite_all

Kernel = Callable[[np.ndarray, int, int], bool]
"""(addresses, lo, hi) -> True when an output of elements [lo, hi) is not finite. addresses:
where element 0 of each array would lie: the experts, the base (a dummy when the plan does
not read it), the plan's further inputs, then the output."""

Scan = Callable[[np.ndarray, int, int], Any]
"""(addresses, lo, hi) -> what a scan of the unit's inputs found (`fusedscan`: the norm scan
of a streamed merge), run before the kernel on the same addresses."""

Source = int | RemoteFile  # a local file's descriptor, or a mounted object
Place = tuple[Source, int, int]  # (source, offset of the tensor's element 0, itemsize)


class Files:
    """Input files opened once each (local: regular files only, no symlink followed)."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def place(self, meta: TensorMeta) -> Place:
        remote = remote_file(meta.path)
        if remote is not None:
            return remote, meta.offset, meta.dtype.itemsize
        fd = self.fds.get(meta.path)
        if fd is None:
            fd = self.fds[meta.path] = open_regular(meta.path)
        return fd, meta.offset, meta.dtype.itemsize

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def read(source: Source, view: memoryview, offset: int, *, path: Path, name: str) -> None:
    """Fill `view` from the input at `offset`: a pread of a local file (a short file is a
    StorageError naming it and the tensor), a ranged GET of a mounted object."""
    if isinstance(source, RemoteFile):
        source.read_into(offset, view)
    else:
        pread_into(source, view, offset, path=path, name=name)


def read_all(reads: Sequence[tuple[Source, memoryview, int, Path]], name: str,
             fetch: ThreadPoolExecutor | None) -> None:
    """Fill each (source, view, offset, path) with `read`: the GETs of mounted objects all
    at once on `fetch` (each waits on the network; one after another, a unit's K + 1 would
    add up their latencies), local preads here. Returns when no read may still fill a view
    (the caller reuses the buffers)."""
    fetching: list[Future] = []
    try:
        for source, view, offset, path in reads:
            if fetch is not None and isinstance(source, RemoteFile):
                fetching.append(fetch.submit(read, source, view, offset, path=path, name=name))
            else:
                read(source, view, offset, path=path, name=name)
        for job in fetching:
            job.result()
    finally:
        for job in fetching:
            job.cancel()
        for job in fetching:
            if not job.cancelled():
                job.exception()


def unread(place: Place, skip: bool) -> Place:
    """A unit's place of an input it does not read (itemsize 0), or the place as it is."""
    return (place[0], place[1], 0) if skip else place


@dataclass(frozen=True)
class Unit:
    """Elements [lo, hi) of one tensor, and the kernel that merges them."""

    name: str
    kernel: Kernel
    lo: int
    hi: int
    # the inputs (see Kernel), then the output: (source, offset of the tensor's element 0,
    # itemsize); itemsize 0 for an input not read (the base, where the plan does not read it)
    places: tuple[Place, ...]
    paths: tuple[Path, ...]  # of the inputs, for errors
    last: bool = False  # the tensor's last unit
    writes: bool = True  # False: a scan's unit (no output; the kernel counts)
    scan: Scan | None = None  # run on the inputs before the kernel (a streamed merge's)
    fetch: ThreadPoolExecutor | None = None  # for reads of mounted objects (`read_all`)
    alloc: Callable[[int], np.ndarray] | None = None  # the host buffers (Plan.alloc)


def _empty(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, np.uint8)


def run(unit: Unit, buffers: threading.local) -> tuple[bool, Any]:
    """One unit on a pool thread: read its rows, scan, merge, write; (True if an output is
    not finite (nothing is written then), what the scan found or None)."""
    count = unit.hi - unit.lo
    if not hasattr(buffers, "arrays"):
        buffers.arrays = []
    while len(buffers.arrays) < len(unit.places):
        buffers.arrays.append(np.empty(0, np.uint8))
    addresses = np.empty(len(unit.places), np.int64)
    reads: list[tuple[Source, memoryview, int, Path]] = []
    for i, (source, offset, size) in enumerate(unit.places):
        if buffers.arrays[i].size < count * size:
            buffers.arrays[i] = (unit.alloc or _empty)(count * size)
        if size and i < len(unit.places) - 1:
            view = memoryview(buffers.arrays[i][:count * size])
            reads.append((source, view, offset + unit.lo * size, unit.paths[i]))
        # the kernel indexes elements [lo, hi) from the tensor's element 0
        addresses[i] = buffers.arrays[i].ctypes.data - unit.lo * size
    read_all(reads, unit.name, unit.fetch)
    found = unit.scan(addresses, unit.lo, unit.hi) if unit.scan is not None else None
    bad = unit.kernel(addresses, unit.lo, unit.hi)
    if not bad and unit.writes:
        out = len(unit.places) - 1  # the thread may hold more buffers (another plan's)
        fd, offset, size = unit.places[out]
        pwrite_all(fd, memoryview(buffers.arrays[out][:count * size]), offset + unit.lo * size)
    return bool(bad), found
