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


def run_cli(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meritrun.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("local-run")
    proc = run_cli("run", str(EXAMPLE), "--local", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir


def test_example_reaches_succeeded_with_plan_and_artifacts(finished_run):
    status = load_status(finished_run / "status.json")
    assert status.phase == "Succeeded"
    assert status.plan.strategy == "conflictPCA" and len(status.partitions) == 2
    assert sorted(s for p in status.partitions for s in p.sources) == sorted(
        ["copy", "sort", "reverse", "upper"])
    for p in status.partitions:
        assert p.state == "Succeeded" and p.tokens > 0 and p.artifact.sha256
    assert any(c.type == "Ready" and c.status == "True" for c in status.conditions)
    store = finished_run / "store" / "runs" / "example"
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


def test_interrupted_run_resumes_without_redoing_finished_work(tmp_path):
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "meritrun.cli", "run", str(EXAMPLE), "--local",
           "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    plan = workdir / "store" / "runs" / "example" / "plan" / "attempt-1" / "plan.json"
    deadline = time.monotonic() + 240
    try:
        while not plan.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert plan.exists(), "profile stage never finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage processes
        proc.wait(timeout=30)
    plan_mtime = plan.stat().st_mtime_ns
    interrupted = load_status(workdir / "status.json")
    assert interrupted.phase in ("Profiling", "Training")
    done = run_cli("run", str(EXAMPLE), "--local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_status(workdir / "status.json").phase == "Succeeded"
    assert plan.stat().st_mtime_ns == plan_mtime, "the finished profile stage ran again"
    assert not (workdir / "store" / "runs" / "example" / "plan" / "attempt-2").exists()
