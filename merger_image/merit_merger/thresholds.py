"""Per-tensor thresholds for every expert, streamed: TIES's trim, without whole tensors.

TIES keeps, per expert and per tensor, the magnitudes |tau_k| at or above the k-th largest
of that tensor. Ranking a whole tensor (`topk`) needs the tensor and topk's scratch in
memory, several times the largest tensor per expert. Instead the engine streams the model's
blocks twice before merging: pass 1 counts the high 16 bits of each expert's |tau_k| per
tensor, pass 2 the low 16 bits inside the bin holding the k-th largest (`KthLargest`: an
exact radix select, the same value `kthvalue` gives). Between the passes each tensor keeps
only (bin, rank) per expert; each histogram lives while its tensor is being counted. The
experts' counts are independent, so they run on the math threads (one expert per task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .blocks import Block, BlockLoader, Item
from .methods import MergeMethod
from .selection import KthLargest

MapFn = Callable[[Callable[[int], None], Iterable[int]], Any]


def tensor_thresholds(method: MergeMethod, params: Any, inputs: BlockLoader,
                      items: Sequence[Item], *, device: torch.device,
                      map_fn: MapFn) -> dict[str, list[float]]:
    """{tensor name: [t_k per expert]} for every floating tensor (two streamed passes)."""
    floats = [it for it in items if inputs.base.meta(it[0]).dtype.is_floating_point
              and inputs.base.meta(it[0]).numel > 0]
    results: dict[str, list[float]] = {}
    selectors: dict[str, list[KthLargest]] = {}

    def count(block: Block, first: bool) -> None:
        sels = selectors.get(block.name)
        if sels is None:
            k = method.tensor_k(inputs.base.meta(block.name).numel, params)
            sels = selectors[block.name] = [KthLargest(k) for _ in inputs.experts]
        base = block.base.float()  # once per block, not once per expert

        def one(i: int) -> None:
            s = method.saliency(base, block.experts[i], None, params)
            (sels[i].add_first if first else sels[i].add_second)(s)
        list(map_fn(one, range(len(inputs.experts))))

    for first in (True, False):
        current: str | None = None
        for block in inputs.blocks(floats, device):
            if current is not None and block.name != current:
                _finish(current, first, selectors, results)
            current = block.name
            count(block, first)
        if current is not None:
            _finish(current, first, selectors, results)
    return results


def _finish(name: str, first: bool, selectors: dict[str, list[KthLargest]],
            results: dict[str, list[float]]) -> None:
    """A tensor's blocks are all counted: keep (bin, rank) after pass 1, the thresholds
    after pass 2, and drop the histograms."""
    if first:
        for s in selectors[name]:
            s.end_first()
    else:
        results[name] = [s.result() for s in selectors.pop(name)]
