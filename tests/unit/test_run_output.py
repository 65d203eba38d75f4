"""What `meritrun run --local` prints: each warning once (issue 12 point 10), not once by the
progress view and again by the log. Run as a process, so the CLI's own logging setup counts."""

from __future__ import annotations

import subprocess
import sys

import yaml

# The real CLI, with a round that posts one Warning event and ends the run.
PROGRAM = """
import sys
from meritrun import local
from meritrun.api import MeritRunStatus
from meritrun.cli import main
from meritrun.pipeline import Decision, Event

def run_round(backend, spec, status, *, now, policy):
    event = Event("Warning", "PartitionFailed", "partition p0 attempt 1 failed: boom")
    backend.post_event(event)
    return Decision(status=MeritRunStatus(phase="Succeeded"), events=(event,))

local.run_round = run_round
sys.exit(main(sys.argv[1:]))
"""


def test_a_warning_event_is_printed_once(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": "r"},
        "spec": {"baseModel": {"uri": "base"}, "data": {"uri": "data.jsonl"}}}))
    done = subprocess.run([sys.executable, "-c", PROGRAM, "run", str(tmp_path / "run.yaml"),
                           "--local", "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert printed.count("partition p0 attempt 1 failed: boom") == 1, printed
