"""Tokenizing a rank's share of the examples in a pool of worker processes.

Tokenizing a million chat examples with a Python-level template takes minutes in one process,
before the first step. Each rank hands its share (shares.py decides which) to a pool of
`workers` processes; results come back in index order from the one rule
(`meritrun.textenc.encode_example`), so the encoding is exactly the one-process encoding.
The pool forks: the children inherit the loaded tokenizer instead of re-importing transformers
(spawn costs seconds per worker and leaves a resource-tracker process behind), and they touch
neither torch nor CUDA nor the process group, which is what makes forking a process that has
them safe. Small shares stay in-process: starting workers costs more than it saves. Where fork
does not exist the share is tokenized in-process. It does not decide who holds what.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from functools import partial

from meritrun.data import Example
from meritrun.textenc import Encoded, encode_example

log = logging.getLogger(__name__)

WORKERS_ENV = "MERITRUN_TOKENIZE_WORKERS"
MIN_PER_WORKER = 2000  # examples below which another process does not pay for its start
CHUNK = 256  # examples per task: large enough to amortize pickling, small enough to balance

_tokenizer = None  # the tokenizer forked workers inherit (set only around a pool)


def default_workers(local_world: int) -> int:
    """$MERITRUN_TOKENIZE_WORKERS, else this node's CPUs shared among its ranks (max 8)."""
    wanted = os.environ.get(WORKERS_ENV)
    if wanted:
        return max(1, int(wanted))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cpus or 1) // max(1, local_world)))


def encode_all(tokenizer, examples: dict[int, Example], *, max_len: int, workers: int = 1,
               min_per_worker: int = MIN_PER_WORKER) -> dict[int, Encoded]:
    """index -> encoded example, in index order; in up to `workers` processes, one per
    `min_per_worker` examples."""
    global _tokenizer
    workers = min(workers, len(examples) // max(1, min_per_worker))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return {i: encode_example(tokenizer, ex, max_len=max_len) for i, ex in examples.items()}
    items = list(examples.items())
    chunks = [items[k:k + CHUNK] for k in range(0, len(items), CHUNK)]
    log.info("tokenizing %d examples in %d processes", len(items), workers)
    out: dict[int, Encoded] = {}
    _tokenizer = tokenizer  # what the forked workers inherit
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap(partial(_encode_chunk, max_len=max_len), chunks):
                out.update(part)
    finally:
        _tokenizer = None
    return out


def _encode_chunk(chunk: list[tuple[int, Example]], *, max_len: int) -> dict[int, Encoded]:
    return {i: encode_example(_tokenizer, ex, max_len=max_len) for i, ex in chunk}
