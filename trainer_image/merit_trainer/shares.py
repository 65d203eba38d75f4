"""Which rank holds which example, and which rows each rank feeds at each step.

Every rank reads and tokenizes only its own share of the examples (raw index i belongs to
rank i % world; sources.py streams it out of the files), in a pool of worker processes when
the share is large (tokenizing.py), so no rank holds every example, raw or encoded. The
ranks then exchange a small catalogue (supervised and total tokens
of each example that keeps a supervised token), from which every rank computes, without
further communication, the same step plan, the global token counts of each step and how many
micro-batches every rank runs.

The batch of a step is the one the single-process loop always fed (`batch_indices` over the
kept examples), only split by owner, so the token accounting and the optimisation are those
of one process; only the float summation order differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meritrun.data import Example
from meritrun.textenc import IGNORE, Encoded

from .checkpoint import batch_indices
from .dist import Dist, all_gather
from .tokenizing import MIN_PER_WORKER, encode_all


@dataclass(frozen=True)
class Catalogue:
    """The kept examples in data order: raw index, supervised tokens, total tokens."""

    raw: list[int]
    supervised: list[int]
    lengths: list[int]
    skipped: int

    def __len__(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class StepRows:
    """One step: this rank's rows, its micro-batches, and the global token counts."""

    mine: list[int]  # raw indices this rank feeds
    micro_steps: int  # forward/backward passes every rank runs (equal on all ranks)
    supervised: int  # supervised tokens of the whole step, over all ranks
    total: int


def encode_share(tokenizer, share: dict[int, Example], *, max_len: int, workers: int = 1,
                 min_per_worker: int = MIN_PER_WORKER) -> dict[int, Encoded]:
    """raw index -> encoded example, for this rank's share (empty ones included), tokenized
    in up to `workers` processes, one per `min_per_worker` examples (tokenizing.py)."""
    return encode_all(tokenizer, share, max_len=max_len, workers=workers,
                      min_per_worker=min_per_worker)


def build_catalogue(dist: Dist, share: dict[int, Encoded]) -> Catalogue:
    """Gather every rank's (index, supervised, length) and keep examples with a target."""
    mine = [(i, e.supervised, len(e.input_ids)) for i, e in share.items()]
    rows = sorted(r for part in all_gather(dist, mine) for r in part)
    kept = [r for r in rows if r[1] > 0]
    return Catalogue(raw=[r[0] for r in kept], supervised=[r[1] for r in kept],
                     lengths=[r[2] for r in kept], skipped=len(rows) - len(kept))


def step_rows(catalogue: Catalogue, step: int, *, dist: Dist, batch_size: int,
              micro_batch_size: int, seed: int) -> StepRows:
    """The rows of optimizer step `step` for this rank (pure: same answer on every rank)."""
    positions = batch_indices(step, n=len(catalogue), batch_size=batch_size, seed=seed)
    raw = [catalogue.raw[p] for p in positions]
    per_rank = [sum(1 for i in raw if i % dist.world == r) for r in range(dist.world)]
    return StepRows(
        mine=[i for i in raw if i % dist.world == dist.rank],
        micro_steps=max(1, max(math.ceil(n / micro_batch_size) for n in per_rank)),
        supervised=sum(catalogue.supervised[p] for p in positions),
        total=sum(catalogue.lengths[p] for p in positions),
    )


def micro_batches(rows: list[Encoded], *, count: int, size: int,
                  pad_id: int) -> list[list[Encoded]]:
    """`count` micro-batches of at most `size` rows; a rank with fewer rows than the others
    gets placeholder rows with no supervised token (every rank must run the same passes
    under FSDP, and these add nothing to the loss or the gradients)."""
    placeholder = Encoded([pad_id, pad_id], [IGNORE, IGNORE])
    chunks = [rows[k * size:(k + 1) * size] for k in range(count)]
    return [chunk or [placeholder] for chunk in chunks]
