"""The README's first command (issue 12, point 3): `meritrun demo` ends with the "did it help?"
table, the merged model reaches non-zero exact-match accuracy, and the joint baseline trained
on exactly the partitions' token budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_table_has_accuracy_for_the_merged_model_and_a_joint_baseline(tmp_path: Path):
    workdir = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "meritrun.cli", "demo", "--workdir",
                           str(workdir)], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("held-out loss (acc)"))
    assert header.split()[-5:] == ["base", "p0", "p1", "merged", "joint"]
    report = json.loads((workdir / "report.json").read_text())
    models = report["models"]
    assert models["merged"]["macro"]["accuracy"] > 0
    assert models["joint"]["macro"]["accuracy"] > 0
    assert models["merged"]["macro"]["mean_loss"] < models["base"]["macro"]["mean_loss"]
    assert report["joint_tokens"] == sum(p["tokens"] for p in report["partitions"])
    assert sorted(s for p in report["partitions"] for s in p["sources"]) == [
        "parity", "review", "review-flip", "vowel"]
    card = next((workdir / "store").glob("runs/demo/*/merged/attempt-*/model/README.md"))
    assert "## Held-out scores" in card.read_text()
