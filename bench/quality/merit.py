"""The MERIT table: joint vs random split vs conflict-aware splits, same token budget.

Per seed: profile the sources' gradient conflict at the base with the project's profiler
(`profile_sketches` -> `cosine_matrix` -> `principal_axes`), split with `conflict_split`
(K = 2, 4, 8 from r = 1, 2, 3 axes) and `random_split` (K = 8), train every partition from
the base with `train_partition` (seed = seed + partition index, one epoch of its own data),
merge once by token weight (`merge_models`, method token-weighted) and score the merge on the
held-out split. Joint runs are the K = 1 case (one partition holding every source). The
profile's seed follows the training seed, so the spread over seeds includes the profiler's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meritrun.data import Example

from .budget import arm_epochs
from .runs import Trainer
from .scoring import evaluate_dir, merge_dirs

log = logging.getLogger(__name__)

ARMS = ("joint-1ep", "joint-2ep", "random-8", "merit-2", "merit-4", "merit-8")
# The same partitions merged two other ways, to tell the split's effect from the merge's:
# OTA (curvature-aware, rank-1 moments) and the plain SUM of task vectors (no 1/K dilution).
REMERGES = (("OTA rank-1", "ota", {}), ("sum of task vectors", "task-arithmetic",
                                        {"scale": 1.0}))


@dataclass(frozen=True)
class Profile:
    names: list[str]
    tokens: dict[str, int]
    conflict: list[list[float]]
    scores: dict[str, list[float]]
    explained: list[float]
    seconds: float


def profile_sources(base_dir: Path, by_source: Mapping[str, Sequence[Example]], *, seed: int,
                    samples: int, dim: int, cache: Path) -> Profile:
    """Gradient sketches at the base, the conflict matrix and 3 principal axes (cached)."""
    from merit_trainer.profiling import profile_sketches
    from merit_trainer.profiling.conflict import cosine_matrix, principal_axes
    from meritrun.api import ProfilingSpec

    if cache.is_file():
        return Profile(**json.loads(cache.read_text()))
    started = time.monotonic()
    spec = ProfilingSpec(calibration_samples=samples, stride=1, projection_dim=dim, seed=seed,
                         parameters="attention", micro_batch_size=16)
    sketches = profile_sketches(base_dir, by_source, spec, max_seq_len=64)
    c = cosine_matrix(sketches.matrix, sketches.names)
    analysis = principal_axes(c, 3, centered=True)
    profile = Profile(
        names=sketches.names, tokens=dict(sketches.tokens), conflict=c.tolist(),
        scores={n: analysis.scores[i].tolist() for i, n in enumerate(sketches.names)},
        explained=list(analysis.explained_variance), seconds=time.monotonic() - started)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(profile.__dict__))
    return profile


def arm_partitions(arm: str, profile: Profile, *, seed: int) -> list[list[str]]:
    """The sources of each partition of one arm (K = 1 for the joint arms)."""
    from meritrun.partitioning import conflict_split, random_split

    if arm.startswith("joint"):
        return [list(profile.names)]
    k = int(arm.split("-")[1])
    if arm.startswith("random"):
        return random_split(profile.names, profile.tokens, k, seed=seed)
    axes = {2: 1, 4: 2, 8: 3}[k]
    return conflict_split({n: s[:axes] for n, s in profile.scores.items()}, profile.tokens, axes,
                          seed=seed)


def run_arm(trainer: Trainer, arm: str, parts: list[list[str]], *, base_dir: Path, seed: int,
            lr: float, held_out: Sequence[Example], max_new_tokens: int) -> dict:
    """Train the arm's partitions, merge them by token weight, score the merge."""
    names, manifests = [], []
    for i, sources in enumerate(parts):
        name = f"{arm}-s{seed}-p{i}"
        manifests.append(trainer.train(name, base_dir=base_dir, sources=sources,
                                       epochs=arm_epochs(arm), lr=lr, seed=seed, index=i))
        names.append(name)
    train_seconds = [train_seconds_of(trainer.artifact(n)) for n in names]
    if len(names) == 1:
        model_dir, merge_seconds = trainer.model_dir(names[0]), 0.0
    else:
        model_dir, merge_seconds = merge_dirs(
            trainer.workdir / "merged" / f"{arm}-s{seed}", base_dir=base_dir,
            artifacts=[trainer.artifact(n) for n in names], method="token-weighted")
    scores = evaluate_dir(model_dir, held_out, max_new_tokens=max_new_tokens)
    return {"arm": arm, "seed": seed, "partitions": parts,
            "tokens": [m.tokens.supervised for m in manifests],
            "train_seconds": train_seconds, "merge_seconds": merge_seconds,
            "eval_seconds": scores["seconds"], "scores": scores["sources"]}


def remerge_arm(trainer: Trainer, row: dict, *, base_dir: Path, held_out: Sequence[Example],
                max_new_tokens: int) -> dict[str, dict]:
    """{label: per-source scores} of the arm's trained partitions merged by each REMERGES
    method (nothing for a joint arm: one partition, nothing to merge)."""
    arm, seed, k = row["arm"], row["seed"], len(row["partitions"])
    if k == 1:
        return {}
    artifacts = [trainer.artifact(f"{arm}-s{seed}-p{i}") for i in range(k)]
    out = {}
    for label, method, params in REMERGES:
        model_dir, _ = merge_dirs(trainer.workdir / "merged" / f"{arm}-s{seed}-{method}",
                                  base_dir=base_dir, artifacts=artifacts, method=method,
                                  params=params)
        out[label] = evaluate_dir(model_dir, held_out, max_new_tokens=max_new_tokens)["sources"]
    return out


def train_seconds_of(artifact: Path) -> float:
    """The trainer's own wall time, from the artifact's train_log.json (survives resumes)."""
    return float(json.loads((artifact / "train_log.json").read_text())["seconds"])
