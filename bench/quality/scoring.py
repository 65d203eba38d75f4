"""Evaluating and merging model directories, with results cached next to each model.

Evaluation is `merit_merger.evaluation.evaluate_model` (held-out supervised loss and greedy
exact-match accuracy per source); merging is `merit_merger.engine.merge_models` with the
registered methods. Both are cached on disk (eval.json beside the model, merge output dirs
kept) so a resumed benchmark does not redo them. No training here.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meritrun.data import Example

log = logging.getLogger(__name__)

EVAL_NAME = "quality-eval.json"
SHARD_BYTES = 1 << 30


def evaluate_dir(model_dir: Path, held_out: Sequence[Example], *, max_new_tokens: int,
                 generate: bool = True, cache_key: str = "eval") -> dict[str, Any]:
    """{"sources": {name: {"accuracy", "loss"}}, "seconds"}; cached per (dir, cache_key)."""
    from merit_merger.evaluation import evaluate_model, load_model

    # Beside the model dir, never inside: the merge engine copies the base dir's extra files
    # into every merged dir, and a cached score would travel with them.
    model_dir = Path(model_dir)
    cache = model_dir.parent / f"{model_dir.name}.{cache_key}.{EVAL_NAME}"
    if cache.is_file():
        return json.loads(cache.read_text())
    started = time.monotonic()
    model, tokenizer = load_model(model_dir)
    result = evaluate_model(model, tokenizer, held_out, batch_size=64,
                            max_new_tokens=max_new_tokens, generate=generate, max_seq_len=64)
    out = {"sources": {name: {"accuracy": s.accuracy, "loss": s.mean_loss}
                       for name, s in result.sources.items()},
           "seconds": round(time.monotonic() - started, 3)}
    cache.write_text(json.dumps(out, indent=1))
    return out


def merge_dirs(
    out_dir: Path, *, base_dir: Path, artifacts: Sequence[Path], method: str,
    params: Mapping[str, Any] | None = None, moments: Sequence[Path] | None = None,
) -> tuple[Path, float]:
    """Merge partition artifacts with the engine; (model dir, seconds). Reused when done.

    `moments` overrides each artifact's second-moment file (rank-1 vs full comparison)."""
    import dataclasses

    from merit_merger.engine import merge_models
    from merit_merger.sources import PartitionSource

    done = out_dir / "merge_seconds.json"
    if done.is_file():
        return out_dir, json.loads(done.read_text())["seconds"]
    sources = [PartitionSource.from_artifact(a) for a in artifacts]
    if moments is not None:
        sources = [dataclasses.replace(s, moments=m) for s, m in zip(sources, moments,
                                                                       strict=True)]
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.monotonic()
    merge_models(base_dir=base_dir, partitions=sources, method=method, params=dict(params or {}),
                 out_dir=out_dir, shard_size_bytes=SHARD_BYTES)
    seconds = time.monotonic() - started
    done.write_text(json.dumps({"seconds": seconds, "method": method,
                                "params": dict(params or {})}))
    return out_dir, seconds


def mean_over(scores: Mapping[str, Mapping[str, float]], names: Sequence[str], key: str
              ) -> float:
    """Macro mean of one metric over the named sources."""
    return sum(scores[n][key] for n in names) / len(names)
