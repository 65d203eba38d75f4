"""Streaming writer of the merged model in the Hugging Face sharded safetensors layout.

The shards are planned before the first tensor arrives (every output name, dtype and shape is
known from the base): each header is written up front and each block of rows goes straight
to its final offset with pwrite, in a writer thread, so copying the output into the page
cache overlaps the merge of the next block (at most `depth` blocks in flight; the caller must
not change a block it handed over until `depth` more writes were asked for). The writer never
holds a shard in memory, so the peak memory of a merge is the working set of the blocks being
merged and written, whatever the shard size. Shards are
written under temporary names and renamed on close; a single shard is `model.safetensors`,
several are `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meritrun.errors import StorageError

from .dtypes import Dtype
from .io import INDEX_NAME, SINGLE_NAME

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Sequence[OutputTensor], shard_size_bytes: int) -> list[list[OutputTensor]]:
    """Tensors in order, cut into shards of at most shard_size_bytes (a larger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(shard: Sequence[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes output tensors, in blocks of rows, straight into pre-planned HF shards."""

    def __init__(self, out_dir: Path, tensors: Sequence[OutputTensor], *,
                 shard_size_bytes: int, depth: int = 2) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards = plan_shards(tensors, shard_size_bytes)
        self.names = shard_names(len(shards))
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> fd, offset, nbytes
        self._left: dict[str, int] = {}
        self._fds: list[int] = []
        for shard, fname in zip(shards, self.names, strict=True):
            fd = os.open(self._partial(fname), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            header = _header_bytes(shard)
            pwrite_all(fd, header, 0)
            offset = len(header)
            for t in shard:
                self._where[t.name] = (fd, offset, t.nbytes)
                self._left[t.name] = t.nbytes
                offset += t.nbytes
            os.ftruncate(fd, offset)
        self.weight_map = {t.name: fname for shard, fname in zip(shards, self.names, strict=True)
                           for t in shard}
        self.bytes_written = 0
        self.total_bytes = sum(t.nbytes for t in tensors)
        self.depth = depth
        # the blocks ride along with their futures, so the caller's thread drops them
        self._pending: deque[tuple[Future, torch.Tensor]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write")

    def _partial(self, fname: str) -> Path:
        return self.out_dir / f".{fname}.partial"

    def write(self, name: str, block: torch.Tensor, *, row_start: int = 0) -> None:
        """Queue a CPU tensor holding rows [row_start, row_start + len) of output `name`
        (written by the writer thread; see the module docstring for when it may be reused)."""
        import torch  # the torch pass's blocks (the fused pass writes at `place` itself)

        fd, offset, nbytes = self._where[name]
        block = block.contiguous()
        data = block.reshape(-1).view(torch.uint8).numpy()
        rows = block.shape[0] if block.ndim else 1
        row_bytes = len(data) // rows if rows else 0
        job = self._pool.submit(pwrite_all, fd, memoryview(data), offset + row_start * row_bytes)
        self._pending.append((job, block))
        self._left[name] -= len(data)
        self.bytes_written += len(data)
        while len(self._pending) > self.depth:
            self._pending.popleft()[0].result()

    def place(self, name: str) -> tuple[int, int, int]:
        """Where output `name` goes: (fd, offset, nbytes). Whoever writes it there directly
        (see `fusedmerge`) calls `filled` when it is whole."""
        return self._where[name]

    def filled(self, name: str) -> None:
        """Output `name` was written whole at its `place`."""
        self.bytes_written += self._left[name]
        self._left[name] = 0

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()

    def close(self) -> list[Path]:
        """Check every byte was written, publish the shards (and the index); return the files."""
        unfinished = [n for n, left in self._left.items() if left != 0]
        if unfinished:
            self.abort()
            raise StorageError(f"merge output incomplete: {unfinished[:3]} not fully written")
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        self._pool.shutdown()
        for fd in self._fds:  # no fsync: the stage uploads the files, it does not keep them
            os.close(fd)
        self._fds.clear()
        files = []
        for fname in self.names:
            os.replace(self._partial(fname), self.out_dir / fname)
            files.append(self.out_dir / fname)
        if len(self.names) > 1:
            total = sum(self._where[n][2] for n in self.weight_map)
            index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
            files.append(self.out_dir / INDEX_NAME)
        return files

    def abort(self) -> None:
        for job, _ in self._pending:
            job.cancel()
        self._pool.shutdown(wait=True)  # no write may land in a file being removed
        self._pending.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for fname in self.names:
            self._partial(fname).unlink(missing_ok=True)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
