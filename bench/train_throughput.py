"""Train-stage throughput: the old hand-written loop vs the FSDP2 engine, 1 and 2 processes.

Same tiny model (the demo's Qwen2 shape), same data (the demo's synthetic sources), same
training configuration; each arm runs in its own process(es) and reports the trained tokens
per second (total tokens fed / wall time of train_partition, model load and artifact upload
included, as a Job sees it) and the peak RSS (VmHWM) of rank 0. The old loop is read from git
history (LEGACY_COMMIT) into a temporary package, so it runs exactly as it was. Not a timed test.

    python bench/train_throughput.py [--arms legacy,engine1,engine2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "350cf39"  # the last commit with the single-device loop
LEGACY_FILES = ["training.py", "checkpoint.py", "moments.py", "sources.py", "__init__.py"]
DEMO_MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def legacy_package(dest: Path) -> Path:
    """merit_trainer as of LEGACY_COMMIT, importable as `legacy_trainer`."""
    pkg = dest / "legacy_trainer"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in LEGACY_FILES:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show",
             f"{LEGACY_COMMIT}:trainer_image/merit_trainer/{name}"],
            check=True, capture_output=True, text=True).stdout
        (pkg / name).write_text(text)
    return dest


def child(arm: str, params_path: Path, workdir: Path) -> None:
    """One arm in this process (a rank, under torchrun): train, print a JSON line on rank 0."""
    from meritrun.stages import TrainParams

    params = TrainParams.model_validate_json(params_path.read_text())
    if arm == "legacy":
        sys.path.insert(0, str(legacy_package(workdir / "pkg")))
        from legacy_trainer.training import train_partition
    else:
        from merit_trainer.training import train_partition
    started = time.perf_counter()
    manifest = train_partition(params, workdir=workdir / "work", checkpoint_every=0)
    seconds = time.perf_counter() - started
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps({
            "arm": arm, "seconds": round(seconds, 2), "tokens": manifest.tokens.total,
            "tokens_per_s": round(manifest.tokens.total / seconds, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


def prepare(root: Path, epochs: float) -> Path:
    from merit_trainer.tiny import save_tiny_base
    from meritrun.data import write_examples
    from meritrun.stages import TrainParams
    from meritrun.synthetic import DEMO_SOURCES, make_mixture

    base = save_tiny_base(root / "base", seed=0, **DEMO_MODEL)
    train, _ = make_mixture(DEMO_SOURCES, train=240, held_out=1, seed=0)
    write_examples(root / "train.jsonl", train)
    params = TrainParams(
        run="bench", run_uid="bench-uid", attempt=1, storage={"uri": (root / "store").as_uri()},
        base_model=str(base), output="runs/bench/p0", partition="p0", index=0,
        sources=[s for s, _ in DEMO_SOURCES][:2], data={"uri": str(root / "train.jsonl")},
        training={"learningRate": 2e-3, "epochs": epochs, "batchSize": 16, "maxSeqLen": 128,
                  "secondMoments": "rank1"})
    (root / "params.json").write_text(params.model_dump_json())
    return root / "params.json"


def run_arm(arm: str, params: Path, root: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MERITRUN_PROGRESS": "0",
           "MERITRUN_TORCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    me = [str(Path(__file__).resolve()), "--child", arm, str(params), str(root / arm)]
    if arm == "engine2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *me]
        env["OMP_NUM_THREADS"] = env["MERITRUN_TORCH_THREADS"] = str(max(1, threads // 2))
    else:
        cmd = [sys.executable, *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="legacy,engine1,engine2")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per arm")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "PARAMS", "WORKDIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, params, workdir = args.child
        child(arm, Path(params), Path(workdir))
        return
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        params = prepare(Path(tmp), args.epochs)
        results = [run_arm(arm, params, Path(tmp), args.threads)
                   for arm in args.arms.split(",")]
    print(f"{'arm':10s} {'seconds':>8s} {'tokens':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s}")
    for r in results:
        print(f"{r['arm']:10s} {r['seconds']:8.2f} {r['tokens']:8d} {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_mb']:12.1f}")
    legacy = next((r for r in results if r["arm"] == "legacy"), None)
    for r in results:
        if legacy and r is not legacy:
            print(f"{r['arm']}: {legacy['tokens_per_s'] / r['tokens_per_s']:.2f}x slower "
                  "than the legacy loop" if r["tokens_per_s"] < legacy["tokens_per_s"] else
                  f"{r['arm']}: {r['tokens_per_s'] / legacy['tokens_per_s']:.2f}x the legacy "
                  "loop's tokens/s")


if __name__ == "__main__":
    main()
