"""`meritrun demo`: a whole MeritRun on this machine in a few minutes, nothing downloaded.

Builds a tiny Qwen2 base and a synthetic multi-source mixture, writes a real MeritRun YAML
beside them (the same file `meritrun run --local` or, with storage pointed at S3,
`kubectl apply` accepts), runs it with the local backend and ends with a report: the
held-out loss per source of the base, of each partition and of the merged model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .data import write_examples
from .synthetic import DEMO_SOURCES, make_mixture

DEMO_MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2}


def demo_manifest(*, strategy: str) -> dict:
    partitioning: dict = {"strategy": strategy, "axes": 1, "seed": 0}
    if strategy == "manual":
        partitioning["assignments"] = [["copy", "sort"], ["reverse", "upper"]]
    return {
        "apiVersion": "merit.run/v1alpha1",
        "kind": "MeritRun",
        "metadata": {"name": "demo"},
        "spec": {
            "baseModel": {"uri": "base"},
            "data": {"uri": "data/train.jsonl", "heldOutUri": "data/held_out.jsonl"},
            "storage": {"uri": "store"},
            "profiling": {"calibrationSamples": 32, "stride": 2, "projectionDim": 4096,
                          "parameters": "all", "microBatchSize": 16},
            "partitioning": partitioning,
            "training": {"method": "full", "learningRate": 2e-3, "epochs": 3, "batchSize": 16,
                         "maxSeqLen": 64, "warmupRatio": 0.05, "secondMoments": "rank1"},
            "merge": {"method": "tokenWeighted"},
            "backoffLimit": 1,
        },
    }


def prepare_demo(workdir: Path, *, strategy: str) -> Path:
    """Write base model, data and meritrun.yaml into workdir (kept if already there)."""
    from merit_trainer.tiny import save_tiny_base

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "base" / "config.json").exists():
        save_tiny_base(workdir / "base", seed=0, **DEMO_MODEL)
    data_dir = workdir / "data"
    if not (data_dir / "held_out.jsonl").exists():
        data_dir.mkdir(exist_ok=True)
        train, held = make_mixture(DEMO_SOURCES, train=240, held_out=24, seed=0)
        write_examples(data_dir / "train.jsonl", train)
        write_examples(data_dir / "held_out.jsonl", held)
    path = workdir / "meritrun.yaml"
    path.write_text(yaml.safe_dump(demo_manifest(strategy=strategy), sort_keys=False))
    return path


def run_demo(workdir: Path, *, strategy: str = "conflictPCA", parallel: int = 1) -> int:
    from transformers.utils import logging as hf_logging

    from .report import write_demo_report
    from .runner_cli import ProgressView, print_summary, resolve_paths, run_in_workdir
    from .validation import load_run
    from .workdir import resumable

    hf_logging.disable_progress_bar()  # one bar per model load/save drowns the run's own
    workdir = workdir.resolve()
    yaml_path = prepare_demo(workdir, strategy=strategy)
    print(f"demo: tiny base, {len(DEMO_SOURCES)} sources, run spec {yaml_path}")
    run = resolve_paths(load_run(yaml_path), workdir)
    view = ProgressView()
    env = {"MERITRUN_TORCH_THREADS": "1"}  # a tiny model: one thread per stage is fastest
    # Re-running the demo resumes it (or shows its result again); another --strategy, or a
    # failed demo, starts over.
    fresh = not resumable(workdir / "run", run)
    try:
        status = run_in_workdir(run, workdir=workdir / "run", fresh=fresh, max_parallel=parallel,
                                on_round=view, env=env).status
    finally:
        view.close()
    print_summary(status)
    if status.phase != "Succeeded":
        print(f"demo run failed; logs in {workdir / 'run' / 'jobs'}")
        return 1
    write_demo_report(workdir, status, held_out=workdir / "data" / "held_out.jsonl")
    return 0
