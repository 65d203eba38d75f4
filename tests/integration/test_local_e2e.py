"""The local backend end to end on the committed example: real processes, real tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meritrun.local import load_status

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "meritrun.yaml"
HELD_OUT = ROOT / "examples" / "assets" / "data" / "held_out.jsonl"
ENV = {**os.environ, "MERITRUN_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meritrun.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("local-run")
    proc = run_cli("run", str(EXAMPLE), "--local", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (workdir / "run-output.txt").write_text(proc.stdout)
    return workdir


def test_run_ends_with_the_held_out_table_and_shows_training_progress(finished_run):
    """Issue 12: with heldOutUri, `run` says whether the merge helped; the status carried the
    partitions' own progress (step, total, loss) while they trained."""
    printed = (finished_run / "run-output.txt").read_text()
    header = next(line for line in printed.splitlines() if line.startswith("held-out loss"))
    assert header.split()[-4:] == ["base", "p0", "p1", "merged"]
    assert "mean" in printed and "meritrun compare" in printed
    status = load_status(finished_run / "status.json")
    seen = [p.progress for p in status.partitions if p.progress is not None]
    assert seen and all(pr.total and 1 <= pr.step <= pr.total and pr.loss > 0 for pr in seen)
    store = finished_run / "store" / "runs" / "example" / status.run_uid
    assert not list(store.glob("partitions/*/attempt-*/progress.json"))  # not in artifacts
    card = (store / "merged" / "attempt-1" / "model" / "README.md").read_text()
    assert "## Held-out scores" in card and "| p0 |" in card


def test_example_reaches_succeeded_with_plan_and_artifacts(finished_run):
    status = load_status(finished_run / "status.json")
    assert status.phase == "Succeeded"
    assert status.plan.strategy == "conflictPCA" and len(status.partitions) == 2
    assert sorted(s for p in status.partitions for s in p.sources) == sorted(
        ["copy", "sort", "reverse", "upper"])
    for p in status.partitions:
        assert p.state == "Succeeded" and p.tokens > 0 and p.artifact.sha256
    assert any(c.type == "Ready" and c.status == "True" for c in status.conditions)
    store = finished_run / "store" / "runs" / "example" / status.run_uid
    assert status.run_uid == json.loads((finished_run / "run.json").read_text())["run_uid"]
    assert (store / "plan" / "attempt-1" / "plan.json").exists()
    assert (store / "merged" / "attempt-1" / "merge_report.json").exists()


def test_merged_model_loads_and_beats_the_base(finished_run):
    from transformers import AutoModelForCausalLM

    from merit_merger.evaluation import evaluate_dir

    status = load_status(finished_run / "status.json")
    merged = Path(status.model_uri.removeprefix("file://"))
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert sum(p.numel() for p in model.parameters()) > 0
    base_eval = evaluate_dir(ROOT / "examples" / "assets" / "base", HELD_OUT, generate=False)
    merged_eval = evaluate_dir(merged, HELD_OUT, generate=False)
    assert merged_eval.micro_loss == pytest.approx(merged_eval.micro_loss)  # finite, not NaN
    assert merged_eval.micro_loss < float("inf")
    assert merged_eval.micro_loss <= base_eval.micro_loss


def test_demo_report_table_and_files(finished_run, capsys):
    from meritrun.report import write_demo_report

    status = load_status(finished_run / "status.json")
    (finished_run / "base").symlink_to(ROOT / "examples" / "assets" / "base")
    report = write_demo_report(finished_run, status, held_out=HELD_OUT)
    table = capsys.readouterr().out
    assert set(report["models"]) == {"base", "p0", "p1", "merged"}
    for source in ("copy", "sort", "reverse", "upper", "mean"):
        assert source in table
    saved = json.loads((finished_run / "report.json").read_text())
    assert saved["models"]["merged"]["macro"]["mean_loss"] > 0
    assert (finished_run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def stage_processes(workdir: Path, stage: str) -> list[int]:
    """Live stage processes of this workdir running `stage` (by the mark they carry)."""
    from meritrun.workdir import leftover_stages

    found = []
    for pid in leftover_stages(workdir):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stage.encode() in argv:
            found.append(pid)
    return found


def wait_for(predicate, *, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"the runner exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigkilled_runner_takes_its_stages_and_the_rerun_finishes_alone(tmp_path):
    """SIGKILL the runner alone mid-training: its trainer dies with it (no second writer for
    the attempt); a second runner meanwhile is refused; the rerun resumes and completes."""
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "meritrun.cli", "run", str(EXAMPLE), "--local",
           "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: stage_processes(workdir, "train"), timeout=300, what="a trainer",
                 proc=proc)
        run_uid = json.loads((workdir / "run.json").read_text())["run_uid"]
        plan = workdir / "store" / "runs" / "example" / run_uid / "plan" / "attempt-1"
        assert (plan / "plan.json").exists()
        second = run_cli("run", str(EXAMPLE), "--local", "--workdir", str(workdir), timeout=60)
        assert second.returncode == 2
        assert f"in use by another meritrun runner (pid {proc.pid})" in second.stderr
        trainers = stage_processes(workdir, "train")
        proc.send_signal(signal.SIGKILL)  # the runner only: not its process group
        proc.wait(timeout=30)
        wait_for(lambda: not stage_processes(workdir, "train"), timeout=30,
                 what=f"trainer(s) {trainers} to die with their runner")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    plan_mtime = (plan / "plan.json").stat().st_mtime_ns
    assert load_status(workdir / "status.json").phase == "Training"
    done = run_cli("run", str(EXAMPLE), "--local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    status = load_status(workdir / "status.json")
    assert status.phase == "Succeeded" and status.run_uid == run_uid  # the same run, resumed
    assert (plan / "plan.json").stat().st_mtime_ns == plan_mtime, "the profile ran again"
    assert not (plan.parent / "attempt-2").exists()
    assert [p.attempt for p in status.partitions] == [1, 1]  # the killed attempt, resumed
    assert not stage_processes(workdir, "train")
