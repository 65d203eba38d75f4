"""The mixture-search check (DMO): does the merged proxy rank mixtures like real training?

The experts are the OTA table's capability experts of `Sizes.search_families` (three
families). For every candidate of `simplex_grid(3, denominator)` the proxy theta0 +
sum_i w_i tau_i is scored with `MergeProxy` / `score_candidates`, and a real model is trained
from the base on that mixture with the same supervised-token budget as one expert
(`budget.mixture_counts` draws the examples), through the same `train_partition` recipe.
Spearman's rho between proxy and real held-out loss, with a bootstrap interval over
candidates, uses the statistics of `bench/mixture_correlation.py`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from meritrun.data import Example, write_examples

from .budget import mixture_counts
from .runs import Trainer
from .scoring import evaluate_dir, mean_over

log = logging.getLogger(__name__)

# Real mixtures are trained twice (seeds seed and seed + 1): their agreement is the noise
# ceiling any proxy is judged against. Not a Sizes field, so adding it kept earlier runs valid.
REPLICATES = 2


def draw_mixture(pools: Sequence[Sequence[Example]], counts: Sequence[int], *, seed: int
                 ) -> list[Example]:
    """counts[i] examples of pool i (a seeded shuffle, cycled when a pool is too small)."""
    rng = random.Random(f"quality-mixture:{seed}")
    out: list[Example] = []
    for pool, n in zip(pools, counts, strict=True):
        order = list(range(len(pool)))
        rng.shuffle(order)
        out += [pool[order[j % len(pool)]] for j in range(n)]
    return out


def run_search(trainer: Trainer, experts: Mapping[str, Path], fams: Mapping[str, list[str]], *,
               base_dir: Path, train_by_family: Mapping[str, list[Example]],
               held_out: Sequence[Example], denominator: int, lr: float, seed: int,
               tokens_per_example: Mapping[str, float], budget: int) -> dict:
    """Proxy and real mean held-out loss for every candidate; rho and its interval."""
    import numpy as np

    from bench.mixture_correlation import bootstrap_ci, rankdata, spearman
    from merit_merger.search import MergeProxy, score_candidates, simplex_grid

    names = list(experts)
    sources = [s for f in names for s in fams[f]]
    held = [ex for ex in held_out if ex.source in set(sources)]
    candidates = simplex_grid(len(names), denominator)
    started = time.monotonic()
    proxy, tokenizer = MergeProxy.from_dirs(base_dir, [experts[f] for f in names])
    result = score_candidates(proxy, tokenizer, held, candidates, objective="mean-loss",
                              names=names, batch_size=64, max_seq_len=64)
    proxy_scores = np.array(result.scores)
    proxy_seconds = time.monotonic() - started
    started = time.monotonic()
    real = np.zeros((REPLICATES, len(candidates)))
    pools = [train_by_family[f] for f in names]
    for c, w in enumerate(candidates):
        counts = mixture_counts(w, [tokens_per_example[f] for f in names], budget)
        stem = f"mixture-{'-'.join(str(round(x * denominator)) for x in w)}"
        data = trainer.workdir / "data" / f"{stem}.jsonl"
        drawn = draw_mixture(pools, counts, seed=seed + c)
        if not data.is_file():
            write_examples(data, drawn)
        present = list(dict.fromkeys(ex.source for ex in drawn))
        for r in range(REPLICATES):
            run = stem if r == 0 else f"{stem}-r{r}"
            trainer.train(run, base_dir=base_dir, sources=present, epochs=1.0, lr=lr,
                          seed=seed + r, data_uri=data.resolve().as_uri())
            scores = evaluate_dir(trainer.model_dir(run), held, max_new_tokens=1,
                                  generate=False, cache_key="search")
            real[r, c] = mean_over(scores["sources"], sources, "loss")
        log.info("mixture %s: proxy %.4f real %s", w, proxy_scores[c], real[:, c])
    real_scores = real.mean(axis=0)
    lo, hi = bootstrap_ci(proxy_scores, real_scores, seed=seed)
    pick = int(np.argmin(proxy_scores))
    return {
        "families": names, "candidates": [list(c) for c in candidates],
        "proxy": proxy_scores.tolist(), "real": real_scores.tolist(),
        "spearman": spearman(proxy_scores, real_scores), "ci95": [lo, hi],
        "proxy_pick": list(candidates[pick]),
        "proxy_pick_real_rank": int(rankdata(real_scores)[pick]),
        "real_best": list(candidates[int(np.argmin(real_scores))]),
        "real_replicates": real.tolist(),
        "seed_to_seed_spearman": spearman(real[0], real[1]),
        "seed_to_seed_ci95": list(bootstrap_ci(real[0], real[1], seed=seed)),
        "proxy_vs_seed_spearman": [spearman(proxy_scores, row) for row in real],
        "seconds": {"proxy": proxy_seconds, "real": time.monotonic() - started},
    }
