"""The merge pass with torch ops, block by block: every method, on the CPU or a GPU.

The engine (`engine`) plans the pass and owns the writer; this module runs it: for each block
the loader hands out (see `blocks`), the method's merge into reused fp32 workspaces, on the
CPU cut into pieces merged by one thread per core (see `pieces`), the cast into a ring of
output blocks and the finiteness check, then the block goes to the writer thread. The linear
methods take `fusedmerge` instead where it applies (the engine chooses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .blocks import Block, BlockLoader, Buffers, Item
from .methods import MergeInputs, MergeMethod, TensorStats
from .pieces import PieceRunner, all_finite
from .writer import ShardedWriter


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
