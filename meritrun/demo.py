"""`meritrun demo`: a whole MeritRun on this machine in a few minutes, nothing downloaded.

Builds a tiny Qwen2 base and a synthetic multi-source mixture of short-answer tasks (so exact
match is measurable at this scale), writes a real MeritRun YAML beside them (the same file
`meritrun run --local` or, with storage pointed at S3, `kubectl apply` accepts), runs it with
the local backend and ends with the "did it help?" table: held-out loss and accuracy per source
of the base, each partition, the merged model and the joint baseline (one model trained on the
whole mixture with the same token budget, the baseline MERIT claims to match). The joint model
trains beside the run, in a process of its own, so a second core absorbs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from .data import write_examples
from .synthetic import LABEL_SOURCES, LABEL_TASKS, make_mixture

DEMO_MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2}
JOINT = "joint"


def demo_manifest(*, strategy: str) -> dict:
    partitioning: dict = {"strategy": strategy, "axes": 1, "seed": 0}
    if strategy == "manual":
        partitioning["assignments"] = [["review", "vowel"], ["review-flip", "parity"]]
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
        train, held = make_mixture(LABEL_SOURCES, train=240, held_out=24, seed=0,
                                   tasks=LABEL_TASKS)
        write_examples(data_dir / "train.jsonl", train)
        write_examples(data_dir / "held_out.jsonl", held)
    path = workdir / "meritrun.yaml"
    path.write_text(yaml.safe_dump(demo_manifest(strategy=strategy), sort_keys=False))
    return path


def start_joint(run, workdir: Path, env: dict[str, str]
                ) -> tuple[subprocess.Popen | None, str]:
    """Start training the joint baseline: every source in one partition, the same training
    settings, so the same epochs over the same examples (the partitions' token budget). Its
    artifact has a run id of its own (it is no partition of the run); a finished one from an
    earlier demo is kept (None: nothing to wait for)."""
    import os

    from .api import PartitionStatus
    from .artifacts import MANIFEST_NAME, RunId
    from .jobs import train_job
    from .stages import stage_command
    from .storage import open_storage

    sources = [name for name, _ in LABEL_SOURCES]
    job = train_job(RunId(run.metadata.name, JOINT), run.spec,
                    PartitionStatus(name=JOINT, index=0, sources=sources), attempt=1)
    root = run.spec.storage.root_uri()
    uri = f"{root.rstrip('/')}/{job.params.output}"
    if open_storage(root).exists(f"{job.params.output}/{MANIFEST_NAME}"):
        return None, uri
    job_dir = workdir / JOINT
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "params.json").write_text(job.params.model_dump_json(indent=2))
    argv = [*stage_command("train", str(job_dir / "params.json"), python=sys.executable),
            "--workdir", str(job_dir / "work")]
    with (job_dir / "log.txt").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, cwd=job_dir)
    return proc, uri


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait()


def run_demo(workdir: Path, *, strategy: str = "conflictPCA", parallel: int = 1) -> int:
    from transformers.utils import logging as hf_logging

    from .report import write_demo_report
    from .runner_cli import ProgressView, print_summary, resolve_paths, run_in_workdir
    from .validation import load_run
    from .workdir import resumable

    hf_logging.disable_progress_bar()  # one bar per model load/save drowns the run's own
    workdir = workdir.resolve()
    yaml_path = prepare_demo(workdir, strategy=strategy)
    print(f"demo: tiny base, {len(LABEL_SOURCES)} sources, run spec {yaml_path}")
    run = resolve_paths(load_run(yaml_path), workdir)
    env = {"MERITRUN_TORCH_THREADS": "1"}  # a tiny model: one thread per stage is fastest
    joint, joint_uri = start_joint(run, workdir, env)
    view = ProgressView()
    # Re-running the demo resumes it (or shows its result again); another --strategy, or a
    # failed demo, starts over.
    fresh = not resumable(workdir / "run", run)
    try:
        status = run_in_workdir(run, workdir=workdir / "run", fresh=fresh, max_parallel=parallel,
                                on_round=view, env=env).status
    except BaseException:
        stop(joint)  # an interrupted demo leaves no process behind
        raise
    finally:
        view.close()
    print_summary(status)
    if status.phase != "Succeeded":
        stop(joint)
        print(f"demo run failed; logs in {workdir / 'run' / 'jobs'}")
        return 1
    if joint is not None and joint.poll() is None:
        print("demo: waiting for the joint baseline (all sources, same token budget) ...")
    if joint is not None and joint.wait() != 0:
        print(f"joint baseline failed; log in {workdir / 'joint'}", file=sys.stderr)
        joint_uri = None
    write_demo_report(workdir, status, held_out=workdir / "data" / "held_out.jsonl",
                      joint_uri=joint_uri)
    return 0
