"""The merge pass with torch ops, block by block: every method, on the CPU or a GPU.

The engine (`engine`) chooses the pass and owns the writer; this module is imported only
when the torch pass is taken (a fused merge never loads torch) and runs it: the threshold
pre-passes the method needs (`thresholds`), then for each block
the loader hands out (see `blocks`), the method's merge into reused fp32 workspaces, on the
CPU cut into pieces merged by one thread per core (see `pieces`), the cast into a ring of
output blocks and the finiteness check, then the block goes to the writer thread. The linear
methods take `fusedmerge` instead where it applies (the engine chooses).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import Block, BlockLoader, Buffers, Item
from .dtypes import Dtype
from .io import ModelReader, block_rows
from .methods import MergeInputs, MergeMethod, TensorStats
from .moments import MomentReader
from .pieces import PieceRunner, all_finite
from .sources import ExpertReader
from .thresholds import ffg_thresholds, tensor_thresholds
from .writer import ShardedWriter

HOLD_BLOCKS = 5  # TIES's pre-pass keeps the |tau| of a tensor of up to 5 blocks per expert


@dataclass(frozen=True)
class Thresholds:
    """What the pre-passes found: FFG's one threshold per expert over the whole model, or
    TIES's one per expert and tensor; `ran`: a pre-pass was needed."""

    per_tensor: dict[str, list[float]] = field(default_factory=dict)
    model_wide: list[float] | None = None
    ran: bool = False


def math_threads(method: MergeMethod, device: torch.device, threads: int | None) -> int:
    """Threads merging pieces of a block (see `pieces`): `threads` (default one per core) for
    element-wise methods on the CPU, none for the others (they run in the main thread)."""
    if device.type != "cpu" or not method.elementwise:
        return 1
    return threads or len(os.sched_getaffinity(0))


class TorchPass:
    """The torch pass of one merge: its block loader, math threads and torch's intra-op
    threads (set while it is entered, restored after)."""

    def __init__(self, impl: MergeMethod, p: Any, base: ModelReader,
                 experts: list[ExpertReader], moments: list[MomentReader] | None, *,
                 device: str | torch.device, threads: int | None, chunk_elements: int,
                 observing: bool) -> None:
        self.impl, self.p, self.device = impl, p, torch.device(device)
        self.chunk_elements = chunk_elements
        self.inputs = BlockLoader(base, experts, moments, need_base=impl.uses_base(p) or observing,
                                  convert=not impl.stored_dtype_ok)
        self.items = [(m.name, rows) for m in map(base.meta, base.names)
                      for rows in block_rows(m, chunk_elements, elementwise=impl.elementwise)]
        count = math_threads(impl, self.device, threads)
        self.runner = PieceRunner(count)
        self._intra_op = 1 if count > 1 else (threads or torch.get_num_threads())
        self._before = torch.get_num_threads()

    def __enter__(self) -> TorchPass:
        torch.set_num_threads(self._intra_op)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._before)
        self.runner.close()

    def thresholds(self) -> Thresholds:
        """The pre-passes the method needs (none for most)."""
        impl, p = self.impl, self.p
        if impl.needs_thresholds(p):
            return Thresholds(model_wide=ffg_thresholds(
                impl, p, self.inputs, self.items, density=p.density, device=self.device),
                ran=True)
        if impl.needs_tensor_thresholds(p):
            return Thresholds(per_tensor=tensor_thresholds(
                impl, p, self.inputs, self.items, device=self.device, map_fn=self.runner.map,
                hold_elements=HOLD_BLOCKS * self.chunk_elements), ran=True)
        return Thresholds()

    def run(self, writer: ShardedWriter, stats: dict[str, TensorStats], *,
            out_dtypes: Mapping[str, Dtype], thresholds: Thresholds, weights: list[float],
            progress: Callable[[int, int], None] | None,
            observe: Callable[[Block], None] | None,
            on_non_finite: Callable[[str], Exception]) -> None:
        """The merge pass (see `torch_pass`)."""
        torch_pass(self.impl, self.p, self.inputs, self.runner, writer, stats,
                   out_dtypes={n: d.torch for n, d in out_dtypes.items()}, items=self.items,
                   thresholds=(thresholds.per_tensor, thresholds.model_wide),
                   weights=weights, device=self.device, progress=progress, observe=observe,
                   on_non_finite=on_non_finite)


def torch_pass(impl: MergeMethod, p: Any, inputs: BlockLoader, runner: PieceRunner,
               writer: ShardedWriter, stats: dict[str, TensorStats], *,
               out_dtypes: Mapping[str, torch.dtype], items: Sequence[Item],
               thresholds: tuple[dict[str, list[float]], list[float] | None],
               weights: list[float], device: torch.device,
               progress: Callable[[int, int], None] | None,
               observe: Callable[[Block], None] | None,
               on_non_finite: Callable[[str], Exception]) -> None:
    """The merge pass block by block with torch ops (every method; see the module
    docstring), each block handed to the writer."""
    per_tensor, model_wide = thresholds
    work, ring = Buffers(torch.float32), Buffers(torch.uint8)  # main thread only
    for i, block in enumerate(inputs.blocks(items, device)):
        if observe is not None:
            observe(block)
        if block.raw is not None:
            out = block.raw
        else:
            shape = block.experts[0].shape
            buf = work.get("merged", shape.numel()).view(shape)
            args = MergeInputs(block.name, block.base, block.experts, weights,
                               block.moments, per_tensor.get(block.name, model_wide),
                               stats.setdefault(block.name, TensorStats()),
                               out=buf if device.type == "cpu" else None)
            # the writer holds `depth` blocks: slot i is free again at i + depth + 1
            slot = i % (writer.depth + 1)
            if runner.threads > 1:
                out = _slot(ring, slot, out_dtypes[block.name], shape)
                finite = runner.run(lambda a: impl.merge(a, p), args, out)
            else:
                out = _cast(impl.merge(args, p), out_dtypes[block.name], ring, slot)
                finite = all_finite(out)
            if not finite:  # after the cast: an fp16 output overflows too
                raise on_non_finite(block.name)
        writer.write(block.name, out, row_start=block.rows[0] if block.rows else 0)
        if progress is not None:
            progress(writer.bytes_written, writer.total_bytes)


def _slot(ring: Buffers, slot: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Ring slot `slot` as an empty tensor of the output dtype and the block's shape."""
    return ring.get(slot, shape.numel() * dtype.itemsize).view(dtype).view(shape)


def _cast(merged: torch.Tensor, dtype: torch.dtype, ring: Buffers, slot: int) -> torch.Tensor:
    """merged in the output dtype, on the CPU, in ring slot `slot` (a CPU result) or fresh."""
    if merged.device.type != "cpu":
        return merged.to(dtype).cpu()
    return _slot(ring, slot, dtype, merged.shape).copy_(merged)
