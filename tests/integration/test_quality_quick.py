"""The quality benchmark's smoke run (`python -m bench.quality --quick`) end to end.

Keeps the benchmark from rotting as the pipeline changes: it trains, profiles, merges and
evaluates through the project's own code, so a changed signature or format breaks it here, not
at the next full run. Checks the one promise its tables rest on: every split arm trains exactly
the joint arm's supervised-token budget (joint-2ep twice it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_every_table_with_equal_budgets(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.quality", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "quick"  # --quick writes under OUT/quick
    report = (out / "report.md").read_text()
    for section in ("## MERIT table", "## OTA table", "## Mixture-search check", "## Cost"):
        assert section in report
    results = json.loads((out / "results.json").read_text())
    budget = results["budget"]
    arms = {(m["arm"], m["seed"]): m for m in results["merit"]}
    assert {a for a, _ in arms} >= {"joint-1ep", "joint-2ep", "random-8", "merit-2", "merit-4",
                                     "merit-8"}
    for (arm, _), row in arms.items():
        want = 2 * budget if arm == "joint-2ep" else budget
        assert sum(row["tokens"]) == want, (arm, row["tokens"], budget)
        assert len(row["tokens"]) == (1 if arm.startswith("joint") else int(arm.split("-")[1]))
        accuracies = [s["accuracy"] for s in row["scores"].values()]
        assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    shares = [s["share_sequential"] for s in results["profiling_share"].values()]
    assert shares and all(math.isfinite(x) and 0 < x < 1 for x in shares)
    assert len(list(out.glob("*.png"))) >= 5
