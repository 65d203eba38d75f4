"""The torch pass's threshold pre-passes: FFG's one per expert over the whole model
(`ffg_thresholds`), and per-tensor ones for every expert, streamed: TIES's trim, without
whole tensors (`tensor_thresholds`).

TIES keeps, per expert and per tensor, the magnitudes |tau_k| at or above the k-th largest
of that tensor. Ranking a whole tensor (`topk`) needs the tensor and topk's scratch in
memory, several times the largest tensor per expert. Instead the engine streams the model's
blocks twice before merging: pass 1 counts the high 16 bits of each expert's |tau_k| per
tensor, pass 2 the low 16 bits inside the bin holding the k-th largest (`KthLargest`: an
exact radix select, the same value `kthvalue` gives). Between the passes each tensor keeps
only (bin, rank) per expert; each histogram lives while its tensor is being counted. A
tensor of at most `hold_elements` (a few blocks) keeps its K saliencies instead and is
settled after one read: on a Qwen2-shaped model every tensor but the embedding. The
experts' counts are independent, so they run on the math threads (one expert per task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .blocks import Block, BlockLoader, Item
from .methods import MergeMethod
from .selection import KthLargest, keep_count

MapFn = Callable[[Callable[[int], None], Iterable[int]], Any]


def ffg_thresholds(method: MergeMethod, params: Any, inputs: BlockLoader,
                   items: Sequence[Item], *, density: float,
                   device: torch.device) -> list[float]:
    """Pre-pass: each expert's global FFG threshold t_i (two streaming passes, exact)."""
    floats = [it for it in items if inputs.base.meta(it[0]).dtype.is_floating_point]
    numel = sum(inputs.base.meta(n).numel for n in dict.fromkeys(n for n, _ in floats))
    selectors = [KthLargest(keep_count(numel, density)) for _ in inputs.experts]
    for first in (True, False):
        for block in inputs.blocks(floats, device):
            for i, sel in enumerate(selectors):
                s = method.saliency(block.base, block.experts[i], block.moments[i], params)
                (sel.add_first if first else sel.add_second)(s)
        if first:
            for sel in selectors:
                sel.end_first()
    return [sel.result() for sel in selectors]


def tensor_thresholds(method: MergeMethod, params: Any, inputs: BlockLoader,
                      items: Sequence[Item], *, device: torch.device, map_fn: MapFn,
                      hold_elements: int) -> dict[str, list[float]]:
    """{tensor name: [t_k per expert]} for every floating tensor. A tensor of at most
    `hold_elements` elements keeps its saliencies between the passes (one read, no second
    stream); larger ones are streamed twice."""
    floats = [it for it in items if inputs.base.meta(it[0]).dtype.is_floating_point
              and inputs.base.meta(it[0]).numel > 0]
    results: dict[str, list[float]] = {}
    selectors: dict[str, list[KthLargest]] = {}
    held: dict[str, list[list[torch.Tensor]]] = {}

    def count(block: Block, first: bool) -> None:
        sels = selectors.get(block.name)
        if sels is None:
            numel = inputs.base.meta(block.name).numel
            k = method.tensor_k(numel, params)
            sels = selectors[block.name] = [KthLargest(k, nonnegative=True)
                                            for _ in inputs.experts]
            if numel <= hold_elements:
                held[block.name] = [[] for _ in inputs.experts]
        keep = held.get(block.name) if first else None
        base = block.base.float()  # once per block, not once per expert

        def one(i: int) -> None:
            s = method.saliency(base, block.experts[i], None, params)
            (sels[i].add_first if first else sels[i].add_second)(s)
            if keep is not None:
                keep[i].append(s)
        list(map_fn(one, range(len(inputs.experts))))

    def finish(name: str, first: bool) -> None:
        """A tensor's blocks are all counted: after pass 1 keep (bin, rank) (and settle a
        held tensor at once), after pass 2 the thresholds; drop the histograms."""
        if not first:
            results[name] = [s.result() for s in selectors.pop(name)]
            return
        sels, keep = selectors[name], held.pop(name, None)

        def settle(i: int) -> None:
            sels[i].end_first()
            if keep is not None:
                for s in keep[i]:
                    sels[i].add_second(s)
                keep[i].clear()
        list(map_fn(settle, range(len(sels))))
        if keep is not None:
            results[name] = [s.result() for s in selectors.pop(name)]

    for first in (True, False):
        current: str | None = None
        for block in inputs.blocks([it for it in floats if it[0] not in results], device):
            if current is not None and block.name != current:
                finish(current, first)
            current = block.name
            count(block, first)
        if current is not None:
            finish(current, first)
    return results
