"""Mixture search by merging (DMO): rank data-mixture weights by scoring merged proxies.

For mixture weights w on the simplex the proxy model is theta0 + sum_i w_i (theta_i - theta0);
its held-out score stands in for the score of a model trained on that mixture, at the cost of
one evaluation instead of one training run. The candidate grids and the ranking are pure
functions; the proxy keeps one fp32 copy of the base and the expert deltas in memory and loads
each candidate into one reusable model in place (sized for models a CPU evaluates). Fetching
artifacts and writing outputs live at the edges (`merit_merger.cli_search`: the CLI and the
`search` stage); the table and plot in `merit_merger.search_plot`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meritrun.artifacts import MANIFEST_NAME, read_manifest
from meritrun.data import Example, read_examples
from meritrun.errors import DataError, SpecError

from .evaluation import EvalResult, evaluate_model, load_model, quiet_loading

log = logging.getLogger(__name__)

Candidate = tuple[float, ...]
# objective -> (better direction, what it reads from an EvalResult)
OBJECTIVES = {
    "mean-loss": ("min", lambda r: r.macro_loss),
    "mean-accuracy": ("max", lambda r: r.macro_accuracy),
    "weighted": ("min", lambda r: r.micro_loss),
}


# --- candidates (pure) ---------------------------------------------------------------------

def simplex_grid(n_experts: int, denominator: int = 8, min_weight: float | None = None
                 ) -> list[Candidate]:
    """Every w with w_i = k_i / denominator, sum 1 and each w_i >= min_weight (default
    1/denominator): 2 experts -> 7 points, 3 experts -> 21 points at denominator 8."""
    if n_experts < 1 or denominator < 1:
        raise SpecError("need at least one expert and a positive denominator", path="search.grid")
    floor = 1.0 / denominator if min_weight is None else min_weight
    lo = max(0, math.ceil(floor * denominator - 1e-9))
    return [tuple(k / denominator for k in parts)
            for parts in _compositions(denominator, n_experts, lo)]


def _compositions(total: int, parts: int, lo: int) -> list[tuple[int, ...]]:
    """Ordered ways to write total as `parts` integers each >= lo (pruned, so no blow-up)."""
    if parts == 1:
        return [(total,)] if total >= lo else []
    return [(k, *rest) for k in range(lo, total - lo * (parts - 1) + 1)
            for rest in _compositions(total - k, parts - 1, lo)]


def dirichlet_candidates(n_experts: int, n: int, seed: int) -> list[Candidate]:
    """The uniform point first, then n seeded Dirichlet(1) draws (uniform on the simplex)."""
    import numpy as np

    if n_experts < 1 or n < 0:
        raise SpecError("need at least one expert and n >= 0", path="search.dirichlet")
    draws = np.random.default_rng(seed).dirichlet(np.ones(n_experts), size=n)
    uniform = (1.0 / n_experts,) * n_experts
    return [uniform] + [tuple(float(x) for x in row) for row in draws]


def objective_score(result: EvalResult, objective: str) -> float:
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {objective!r}; one of {sorted(OBJECTIVES)}",
                        path="search.objective")
    value = OBJECTIVES[objective][1](result)
    return math.nan if value is None else float(value)


def rank_order(scores: Sequence[float], objective: str) -> list[int]:
    """Candidate indices best first; NaN last; ties keep candidate order (stable)."""
    sign = 1.0 if OBJECTIVES[objective][0] == "min" else -1.0
    return sorted(range(len(scores)),
                  key=lambda i: (math.isnan(scores[i]), sign * scores[i] if
                                 not math.isnan(scores[i]) else 0.0))


# --- the proxy: theta0 + sum_i w_i tau_i, in place --------------------------------------------

class MergeProxy:
    """One model instance whose parameters are overwritten per candidate (no re-instantiation)."""

    def __init__(self, model, base: dict, deltas: Sequence[dict]) -> None:
        self.model = model
        self.base = base
        self.deltas = list(deltas)
        self._params = dict(model.named_parameters())

    @classmethod
    def from_dirs(cls, base_dir: Path, expert_dirs: Sequence[Path]) -> tuple[MergeProxy, object]:
        """(proxy, tokenizer): the base in fp32 and one fp32 delta per expert directory."""
        model, tokenizer = load_model(base_dir)
        params = dict(model.named_parameters())
        base = {n: p.detach().clone().float() for n, p in params.items()}
        deltas = []
        for d in expert_dirs:
            state = load_expert_state(Path(d), base_dir=Path(base_dir))
            deltas.append(task_vector(base, state, name=str(d)))
            del state
        return cls(model, base, deltas), tokenizer

    def load(self, weights: Sequence[float]):
        """Write theta0 + sum_i w_i tau_i into the model's parameters; returns the model."""
        import torch

        if len(weights) != len(self.deltas):
            raise SpecError(f"{len(weights)} weights for {len(self.deltas)} experts")
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(self.base[name])
                for w, delta in zip(weights, self.deltas, strict=True):
                    if w:
                        p.add_(delta[name], alpha=float(w))
        return self.model


def load_expert_state(expert_dir: Path, *, base_dir: Path) -> dict:
    """Full fp32 weights of an expert: a partition artifact (manifest.json + model/, full or
    LoRA) or a plain HF model / peft adapter directory. LoRA is merged into the base first."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, lora = expert_dir, (expert_dir / "adapter_config.json").is_file()
    if (expert_dir / MANIFEST_NAME).is_file():
        manifest = read_manifest(expert_dir)
        model_dir, lora = expert_dir / manifest.model_dir, manifest.weights == "lora"
    if not model_dir.is_dir():
        raise DataError(f"expert {expert_dir}: no model directory {model_dir}")
    try:
        if lora:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"expert {expert_dir}: cannot load {model_dir}: {e}") from e
    return dict(model.named_parameters())


def task_vector(base: dict, state: dict, *, name: str) -> dict:
    """tau = theta_expert - theta0 in fp32 for every parameter of the base."""
    missing = sorted(set(base) - set(state))
    if missing:
        raise DataError(f"expert {name} lacks {len(missing)} base tensors, e.g. {missing[0]}")
    out = {}
    for key, b in base.items():
        t = state[key]
        if tuple(t.shape) != tuple(b.shape):
            raise DataError(f"expert {name}: {key} has shape {tuple(t.shape)}, base "
                            f"{tuple(b.shape)}: not fine-tuned from this base")
        out[key] = t.detach().float() - b
    return out


# --- the search ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchResult:
    names: list[str]
    objective: str
    candidates: list[Candidate]
    results: list[EvalResult]
    base: EvalResult | None = None
    seconds: float = 0.0

    @property
    def scores(self) -> list[float]:
        return [objective_score(r, self.objective) for r in self.results]

    @property
    def order(self) -> list[int]:
        return rank_order(self.scores, self.objective)

    @property
    def best(self) -> dict[str, float]:
        return dict(zip(self.names, self.candidates[self.order[0]], strict=True))

    def ranking(self) -> list[dict]:
        scores = self.scores
        return [
            {"rank": rank, "candidate": i,
             "weights": dict(zip(self.names, self.candidates[i], strict=True)),
             "score": scores[i], "mean_loss": self.results[i].macro_loss,
             "weighted_loss": self.results[i].micro_loss,
             "accuracy": self.results[i].macro_accuracy,
             "per_source_loss": {s: v.mean_loss for s, v in self.results[i].sources.items()}}
            for rank, i in enumerate(self.order, start=1)
        ]

    def to_dict(self) -> dict:
        order = self.order
        return {
            "objective": self.objective, "direction": OBJECTIVES[self.objective][0],
            "names": self.names, "best": self.best, "best_score": self.scores[order[0]],
            "candidates": len(self.candidates), "seconds": round(self.seconds, 3),
            "base": None if self.base is None else {
                "score": objective_score(self.base, self.objective), **self.base.to_dict()},
            "ranking": self.ranking(),
        }


def score_candidates(proxy: MergeProxy, tokenizer, examples: Sequence[Example],
                     candidates: Sequence[Candidate], *, objective: str, names: Sequence[str],
                     include_base: bool = True, **eval_kwargs) -> SearchResult:
    """Evaluate every candidate proxy on `examples` (generation only if the objective needs it)."""
    if objective not in OBJECTIVES:
        objective_score(EvalResult({}), objective)  # raises the SpecError naming the choices
    if not candidates:
        raise SpecError("no candidate mixtures to score", path="search")
    eval_kwargs.setdefault("generate", objective == "mean-accuracy")
    start = time.perf_counter()
    base = None
    if include_base:
        base = evaluate_model(proxy.load([0.0] * len(names)), tokenizer, examples, **eval_kwargs)
    results = []
    for n, w in enumerate(candidates, start=1):
        results.append(evaluate_model(proxy.load(w), tokenizer, examples, **eval_kwargs))
        log.info("candidate %d/%d %s: %s = %.4f", n, len(candidates),
                 ", ".join(f"{x:.3f}" for x in w), objective,
                 objective_score(results[-1], objective))
    return SearchResult(list(names), objective, [tuple(c) for c in candidates], results, base,
                        time.perf_counter() - start)


def search_mixtures(
    *,
    base_dir: Path,
    expert_dirs: Sequence[Path],
    names: Sequence[str],
    eval_path: Path,
    candidates: Sequence[Candidate],
    objective: str = "mean-loss",
    **eval_kwargs,
) -> SearchResult:
    """Rank `candidates` (weights in `names` order) by the objective of their merged proxy.

    Experts are partition artifact dirs (manifest.json + model/, full or LoRA) or plain HF model
    dirs fine-tuned from `base_dir`. eval_kwargs go to `evaluate_model` (batch_size, ...).
    """
    if len(names) != len(expert_dirs):
        raise SpecError(f"{len(names)} names for {len(expert_dirs)} experts", path="search")
    bad = [c for c in candidates if len(c) != len(names)]
    if bad:
        raise SpecError(f"candidate {bad[0]} has {len(bad[0])} weights, need {len(names)}")
    with quiet_loading():  # one "Loading weights" bar per expert would bury the ranking
        proxy, tokenizer = MergeProxy.from_dirs(Path(base_dir), [Path(d) for d in expert_dirs])
    examples = read_examples([eval_path])
    if not examples:
        raise DataError(f"{eval_path}: no held-out examples to score the candidates on")
    return score_candidates(proxy, tokenizer, examples, candidates, objective=objective,
                            names=names, **eval_kwargs)
