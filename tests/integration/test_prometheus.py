"""A real Prometheus scraped the operator during the end-to-end run (fixture `e2e_run`).

PromQL saw the runs-by-phase gauge and the reconcile histogram; `promtool check metrics`
accepts the exposition; the counters agree with what the run did.
"""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.prometheus import find_tool

pytestmark = pytest.mark.slow


def samples(exposition: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_promql_sees_runs_by_phase_and_the_reconcile_histogram(e2e_run):
    (runs,) = e2e_run.promql_runs
    assert runs["metric"]["phase"] == "Succeeded" and float(runs["value"][1]) == 1.0
    assert runs["metric"]["job"] == "meritrun-operator"
    (rounds,) = e2e_run.promql_histogram
    assert float(rounds["value"][1]) > 0


def test_promtool_accepts_the_exposition(e2e_run):
    promtool = find_tool("promtool")
    done = subprocess.run([promtool, "check", "metrics"], input=e2e_run.exposition,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert e2e_run.exposition.count("meritrun_") > 20


def test_counters_agree_with_the_run(e2e_run):
    s = samples(e2e_run.exposition)
    assert s[("meritrun_jobs_created_total", (("stage", "train"),))] == 2
    assert s[("meritrun_jobs_created_total", (("stage", "profile"),))] == 1
    assert s[("meritrun_partition_jobs_total", (("result", "succeeded"),))] == 2
    assert s[("meritrun_artifact_uploaded_bytes_total", ())] == sum(
        p["artifact"]["bytes"] for p in e2e_run.status["partitions"])
    assert s[("meritrun_merge_duration_seconds_count", ())] == 1
    assert s[("meritrun_runs", (("phase", "Succeeded"),))] == 1
    assert s[("meritrun_reconcile_total", (("handler", "daemon"),))] >= 3
    (build,) = [labels for name, labels in s if name == "meritrun_build_info"]
    assert dict(build)["version"]
