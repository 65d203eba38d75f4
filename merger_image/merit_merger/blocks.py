"""Loading blocks of rows for the engine: a reader thread, ring buffers and fp32 workspaces.

A block is the same rows of one tensor from the base, every expert and every second-moment
file. The reader thread maps the base's and the experts' rows (`ModelReader.view`: zero-copy,
its pages faulted in by the reader thread, unmapped when the block is dropped) and `pread`s
stored second moments into ring buffers (one per input and slot, reused block after block),
so reading overlaps the math and allocates nothing in steady state; the main thread turns
the raw bytes into fp32 in reused workspace buffers (methods that accumulate the stored dtype
themselves skip this) and applies LoRA deltas; rank-1 moments stay factored (methods expand
them, or raise them to a power, as needed). Keeping every torch allocation in one thread
matters: buffers allocated by one thread and freed by another grew glibc's per-thread arenas
to ~3x the working set in a probe (88 MB instead of 29 MB merging 2 MB tensors). Mappings are
not torch allocations: whichever thread frees the last view unmaps them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .io import Item, ModelReader, Rows
from .methods import Moment, Rank1Moment
from .moments import MomentReader
from .pieces import TRIM_EVERY, trim_heaps
from .sources import ExpertReader


@dataclass
class Block:
    name: str
    rows: Rows
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    moments: list[Moment] | None  # stored v as fp32 tensors, rank-1 v as factors
    raw: torch.Tensor | None = None  # non-float tensors are copied from the base as stored


@dataclass
class RawBlock:
    name: str
    rows: Rows
    slot: int
    base: torch.Tensor | None
    experts: list[torch.Tensor | None]  # None: a LoRA expert (built in the main thread)
    moments: list[torch.Tensor | None] | None  # None: rank-1 factors (handed out as such)


class Buffers:
    """Flat buffers by key, grown on demand and reused: their views are valid until the
    same key is asked for again."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, numel: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=self.dtype)
        return buf[:numel]


def prefetched(items: Iterable, load: Callable[[Any, int], Any], depth: int = 1) -> Iterator:
    """load(item, slot) for each item, `depth` items ahead in a reader thread; slot cycles
    through depth + 1 values, so a slot is reused only after its block was consumed."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read") as pool:
        pending: deque = deque()
        for i, item in enumerate(items):
            pending.append(pool.submit(load, item, i % (depth + 1)))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class BlockLoader:
    """Everything a merge (or the verification scan) reads, block by block."""

    def __init__(self, base: ModelReader, experts: list[ExpertReader],
                 moments: list[MomentReader] | None, *, need_base: bool,
                 convert: bool = True) -> None:
        self.base, self.experts, self.moments = base, experts, moments
        self.need_base = need_base or any(e.lora for e in experts)
        # convert=False: base and full experts are handed out in their stored float dtype
        # (for methods that accumulate them into fp32 themselves: one pass less per input)
        self.convert = convert or any(e.lora for e in experts)
        self._ring = Buffers(torch.uint8)  # reader thread only
        self._work = Buffers(torch.float32)  # main thread only

    def read_raw(self, item: Item, slot: int) -> RawBlock:
        """Reader thread: map the base's and experts' rows, pread stored moments."""
        name, rows = item
        meta = self.base.meta(name)
        nbytes = meta.nbytes if rows is None else (rows[1] - rows[0]) * meta.row_bytes
        floating = meta.dtype.is_floating_point
        base = None
        if self.need_base or not floating:
            base = self.base.view(name, rows)
        if not floating:
            return RawBlock(name, rows, slot, base, [], None)
        experts = [None if e.model is None else e.model.view(name, rows) for e in self.experts]
        moments = None
        if self.moments is not None:
            moments = []
            for i, m in enumerate(self.moments):
                if m.factored(name, meta.shape):
                    moments.append(None)
                else:
                    stored = m.reader.meta(name).dtype.itemsize  # fp32 as written; any float
                    buf = self._ring.get((slot, "v", i), stored * (nbytes // meta.dtype.itemsize))
                    moments.append(m.read_stored(name, meta.shape, rows, out=buf))
        return RawBlock(name, rows, slot, base, experts, moments)

    def materialize(self, raw: RawBlock, device: torch.device) -> Block:
        """Main thread: fp32 blocks (workspace buffers), LoRA experts, rank-1 factors."""
        name, rows, meta = raw.name, raw.rows, self.base.meta(raw.name)
        if not meta.dtype.is_floating_point:
            return Block(name, rows, None, [], None, raw=raw.base)
        as_is = not self.convert
        base = None if raw.base is None else self._fp32(("base",), raw.base, device, as_is)
        experts = []
        for i, (e, t) in enumerate(zip(self.experts, raw.experts, strict=True)):
            if t is None:  # LoRA: base (or saved copy) + B @ A * scaling, rows only
                experts.append(e.read(name, rows, base_block=base).to(device))
            else:
                experts.append(self._fp32(("e", i), t, device, as_is))
        moments = None
        if raw.moments is not None:
            moments = []
            for i, (m, t) in enumerate(zip(self.moments, raw.moments, strict=True)):
                if t is not None:
                    moments.append(self._fp32(("v", i), t, device))
                    continue
                f = m.factors(name, meta.shape, rows)
                moments.append(Rank1Moment(f.row.to(device), f.col.to(device), f.total))
        return Block(name, rows, base, experts, moments)

    def _fp32(self, key: Any, t: torch.Tensor, device: torch.device,
              as_is: bool = False) -> torch.Tensor:
        if t.dtype == torch.float32 or as_is:
            return t.to(device)  # already fp32 (a view of a mapping or ring; read-only use)
        if device.type != "cpu":
            return t.to(device).float()
        return self._work.get(key, t.numel()).view(t.shape).copy_(t)

    def blocks(self, items: Iterable[Item], device: torch.device, depth: int = 1
               ) -> Iterator[Block]:
        for i, raw in enumerate(prefetched(items, self.read_raw, depth)):
            yield self.materialize(raw, device)
            if i % TRIM_EVERY == TRIM_EVERY - 1:  # every pass over the blocks (see trim_heaps)
                trim_heaps()

    def bytes_read(self) -> int:
        readers = [self.base.bytes_read] + [e.bytes_read for e in self.experts]
        return sum(readers) + sum(m.bytes_read for m in self.moments or [])

    def close(self) -> None:
        for reader in [self.base, *self.experts, *(self.moments or [])]:
            reader.close()
