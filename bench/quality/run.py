"""The benchmark's stages in order, with progress lines and per-stage wall time.

data -> stage-2 base -> MERIT table (profile + 6 arms per seed) -> capability experts and the
OTA table -> mixture-search check -> report. Everything trained or merged lives under a work
directory keyed by the sizes, and every step reuses what an earlier (crashed) run finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from meritrun.data import group_by_source, write_examples

from . import merit, ota, search
from .config import Sizes
from .mixture import BASE_TASKS, CONFLICT_FAMILIES, base_mixture, benchmark_mixture, families
from .runs import Trainer
from .scoring import evaluate_dir


@dataclass
class Clock:
    """Prints '[  12.3s] message' lines and keeps each stage's wall time."""

    started: float = field(default_factory=time.monotonic)
    stages: dict[str, float] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t = time.monotonic()
                clock.say(f"{name} ...")

            def __exit__(self, *exc):
                clock.stages[name] = clock.stages.get(name, 0.0) + time.monotonic() - self.t
                if exc[0] is None:
                    clock.say(f"{name} done in {time.monotonic() - self.t:.1f}s")

        return _Stage()


def workdir_for(root: Path, mode: str, sizes: Sizes) -> Path:
    key = hashlib.sha256(json.dumps(sizes.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return root / f"work-{mode}-{key}"


def run_benchmark(sizes: Sizes, *, out: Path, mode: str) -> dict:
    from merit_trainer.tiny import save_tiny_base

    clock = Clock()
    work = workdir_for(out, mode, sizes)
    (work / "data").mkdir(parents=True, exist_ok=True)
    clock.say(f"work dir {work}")
    fams = families()
    conflict = [s for f in CONFLICT_FAMILIES for s in fams[f]]
    with clock.stage("data"):
        train, held = benchmark_mixture(train=sizes.train_per_source,
                                        held_out=sizes.held_out_per_source)
        write_examples(work / "data" / "train.jsonl", train)
        write_examples(work / "data" / "held_out.jsonl", held)
        write_examples(work / "data" / "base.jsonl", base_mixture(per_task=sizes.base_per_task))
    trainer = Trainer(work, (work / "data" / "train.jsonl").resolve().as_uri(),
                      batch_size=sizes.batch_size)
    by_source = group_by_source(train)
    results: dict = {"sizes": sizes.to_dict(), "mode": mode, "families": fams,
                     "conflict_sources": conflict}

    with clock.stage("stage-2 base"):
        init = work / "init"
        if not (init / "config.json").is_file():
            save_tiny_base(init, hidden=sizes.hidden, layers=sizes.layers, heads=sizes.heads,
                           kv_heads=sizes.kv_heads, intermediate=4 * sizes.hidden)
        manifest = trainer.train("base", base_dir=init, sources=[f"base-{t}" for t in BASE_TASKS],
                                 epochs=1.0, lr=sizes.base_lr, seed=1234, moments="none",
                                 data_uri=(work / "data" / "base.jsonl").resolve().as_uri())
        base_dir = trainer.model_dir("base")
        base_scores = evaluate_dir(base_dir, held, max_new_tokens=sizes.max_new_tokens)
        results["base"] = {"steps": manifest.training["steps"],
                           "parameters": _parameters(base_dir), "scores": base_scores["sources"],
                           "train_seconds": merit.train_seconds_of(trainer.artifact("base"))}
        clock.say(f"base: {results['base']['parameters'] / 1e6:.2f}M parameters, "
                  f"{manifest.training['steps']} steps")

    budget, arms_out, profiles = 0, [], {}
    for seed in sizes.seeds:
        with clock.stage(f"MERIT profile seed {seed}"):
            profile = merit.profile_sources(base_dir, by_source, seed=seed,
                                            samples=sizes.calibration_samples,
                                            dim=sizes.projection_dim,
                                            cache=work / "profiles" / f"seed{seed}.json")
            profiles[seed] = profile.__dict__
        budget = sum(profile.tokens.values())
        for arm in merit.ARMS:
            with clock.stage(f"MERIT {arm} seed {seed}"):
                parts = merit.arm_partitions(arm, profile, seed=seed)
                row = merit.run_arm(trainer, arm, parts, base_dir=base_dir, seed=seed,
                                    lr=sizes.lr, held_out=held,
                                    max_new_tokens=sizes.max_new_tokens)
                row["remerged"] = merit.remerge_arm(trainer, row, base_dir=base_dir,
                                                    held_out=held,
                                                    max_new_tokens=sizes.max_new_tokens)
                arms_out.append(row)
                acc = sum(v["accuracy"] for v in row["scores"].values()) / len(row["scores"])
                clock.say(f"  {arm} seed {seed}: K={len(parts)} accuracy {100 * acc:.1f}%")
    results.update(merit=arms_out, profiles=profiles, budget=budget)

    with clock.stage("capability experts"):
        experts = ota.train_experts(trainer, fams, base_dir=base_dir,
                                    epochs=sizes.expert_epochs, lr=sizes.lr, seed=0)
        results["experts"] = {f: {"scores": evaluate_dir(trainer.model_dir(f"expert-{f}"), held,
                                                         max_new_tokens=sizes.max_new_tokens)
                                  ["sources"],
                                  "train_seconds": merit.train_seconds_of(a)}
                              for f, a in experts.items()}
    with clock.stage("OTA table merges"):
        results["ota"] = ota.run_merges(trainer, experts, base_dir=base_dir,
                                        densities=sizes.densities, held_out=held,
                                        max_new_tokens=sizes.max_new_tokens)
    with clock.stage("mixture search"):
        from merit_merger.evaluation import load_model
        from meritrun.textenc import encode_example

        _, tokenizer = load_model(base_dir)
        train_by_family = {f: [ex for s in fams[f] for ex in by_source[s]] for f in fams}
        tpe = {f: sum(encode_example(tokenizer, ex, max_len=64).supervised
                      for ex in exs) / len(exs) for f, exs in train_by_family.items()}
        chosen = {f: experts[f] for f in sizes.search_families}
        expert_budget = int(sizes.expert_epochs * sum(
            tpe[f] * len(train_by_family[f]) for f in chosen) / len(chosen))
        results["search"] = search.run_search(
            trainer, chosen, fams, base_dir=base_dir, train_by_family=train_by_family,
            held_out=held, denominator=sizes.search_denominator, lr=sizes.lr, seed=0,
            tokens_per_example=tpe, budget=expert_budget)
        results["search"]["budget"] = expert_budget
    results["stages"] = clock.stages
    results["total_seconds"] = time.monotonic() - clock.started
    return results


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                n += _numel(f.get_slice(k).get_shape())
    return n


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
