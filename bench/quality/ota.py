"""The OTA table: one capability expert per family, merged by every registered method.

Experts are trained from the base with `train_partition`, saving FULL Adam second moments; the
rank-1 file is derived from the full one with the trainer's own `save_second_moments(kind=
"rank1")` (exactly what a rank-1 run would have saved), so "OTA rank-1 vs full" compares the
compression alone on identical experts. Merges go through `merge_models`; the scores are per
family, and "kept" is the merge's accuracy on a family divided by that family's expert's own
accuracy there (the papers' "fraction of expert performance retained").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from meritrun.artifacts import OPTIMIZER_V_NAME
from meritrun.data import Example

from .runs import Trainer
from .scoring import evaluate_dir, merge_dirs

log = logging.getLogger(__name__)

RANK1_NAME = "optimizer_v_rank1.safetensors"


def merge_recipes(densities: Sequence[float], *, experts: int = 5
                  ) -> list[tuple[str, str, dict, str]]:
    """(label, method, params, moments: "rank1" | "full" | "-") of every merge in the table.

    Task arithmetic and DARE ADD the task vectors (scale lambda): with lambda = 1 and K experts
    the update is K times their average, so DARE is also run at lambda = 1/K."""
    recipes = [
        ("uniform", "uniform", {}, "-"),
        ("task arithmetic (scale 0.5)", "task-arithmetic", {"scale": 0.5}, "-"),
        ("TIES (density 0.2)", "ties", {"density": 0.2}, "-"),
        ("DARE (density 0.5)", "dare", {"density": 0.5, "seed": 0}, "-"),
        (f"DARE (density 0.5, scale 1/{experts})", "dare",
         {"density": 0.5, "seed": 0, "scale": 1.0 / experts}, "-"),
        ("token-weighted", "token-weighted", {}, "-"),
        ("OTA rank-1", "ota", {}, "rank1"),
        ("OTA full", "ota", {}, "full"),
    ]
    for d in densities:
        recipes.append((f"OTA+FFG d={d:g} rank-1", "ota", {"density": d}, "rank1"))
        recipes.append((f"OTA+FFG d={d:g} full", "ota", {"density": d}, "full"))
    return recipes


def train_experts(trainer: Trainer, fams: Mapping[str, list[str]], *, base_dir: Path,
                  epochs: float, lr: float, seed: int) -> dict[str, Path]:
    """family -> expert artifact dir (full moments, plus a derived rank-1 file)."""
    from merit_trainer.moments import load_second_moments, save_second_moments

    out = {}
    for i, (family, sources) in enumerate(fams.items()):
        name = f"expert-{family}"
        manifest = trainer.train(name, base_dir=base_dir, sources=sources, epochs=epochs, lr=lr,
                                 seed=seed, index=i, moments="full")
        artifact = trainer.artifact(name)
        rank1 = artifact / RANK1_NAME
        if not rank1.is_file():
            _, named_v, _ = load_second_moments(artifact / OPTIMIZER_V_NAME)
            sm = manifest.second_moments
            save_second_moments(rank1, named_v, kind="rank1", beta2=sm.beta2, step=sm.step)
        out[family] = artifact
    return out


def run_merges(trainer: Trainer, experts: Mapping[str, Path], *, base_dir: Path,
               densities: Sequence[float], held_out: Sequence[Example],
               max_new_tokens: int) -> list[dict]:
    """Every recipe merged from the same experts and scored on the whole held-out split."""
    rows = []
    artifacts = list(experts.values())
    for label, method, params, moments in merge_recipes(densities, experts=len(artifacts)):
        files = None
        if moments == "rank1":
            files = [a / RANK1_NAME for a in artifacts]
        slug = (label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
                .replace(",", "").replace("/", "-"))
        model_dir, seconds = merge_dirs(trainer.workdir / "merged" / f"ota-{slug}",
                                        base_dir=base_dir, artifacts=artifacts, method=method,
                                        params=params, moments=files)
        scores = evaluate_dir(model_dir, held_out, max_new_tokens=max_new_tokens)
        rows.append({"label": label, "method": method, "params": params, "moments": moments,
                     "merge_seconds": seconds, "scores": scores["sources"]})
    return rows


def family_scores(scores: Mapping[str, Mapping[str, float]], fams: Mapping[str, list[str]],
                  key: str) -> dict[str, float]:
    """Macro mean of one metric per family."""
    return {f: sum(scores[s][key] for s in names) / len(names) for f, names in fams.items()}


def kept_fraction(merged: Mapping[str, float], expert: Mapping[str, float]) -> dict[str, float]:
    """merged / expert accuracy per family (nan where the expert scores 0)."""
    return {f: (merged[f] / expert[f] if expert[f] > 0 else float("nan")) for f in merged}
