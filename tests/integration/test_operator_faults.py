"""Faults on the real control plane, all in one scenario to pay for the stage processes once.

Six runs are applied together to one operator: `retry` (its p1 fails once), `quorum-half`
(p1 always fails, quorum 0.5), `quorum-full` (p1 always fails, quorum 1.0), `no-cuda` (GPUs
the image cannot use: the train stage itself says InvalidSpec), `bad-spec` (a manual
assignment naming a source the spec does not have) and `no-storage`: these two pass the
CRD's schema and fail the models, so they reach the operator's InvalidSpec path (a schema
violation such as `learningRate: 0` never gets that far: the API server refuses it at
admission, checked too). While `retry` trains, the operator is killed with SIGKILL and a new
one started. Failures are injected by the node stand-in (by Job name: a real process that
exits 1 with a MERITRUN_ERROR line); every other pod runs the real stage entry points, and
the real Job controller turns pod results into Job status. Job creations are counted from
the API server's audit log.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from support.kube import KubeCluster, OperatorProcess, wait_until
from support.kube_e2e import apply, node_options, render_example, stage_inputs, wait_phase

pytestmark = pytest.mark.slow
SCENARIO_TIMEOUT_S = 300.0


def injected(job: str) -> bool:
    return job == "retry-p1-a1" or job.startswith(("quorum-half-p1-", "quorum-full-p1-"))


@dataclass
class Scenario:
    status: dict[str, dict[str, Any]]
    creations: dict[str, int]
    events: list[dict[str, Any]]
    phase_at_kill: str
    jobs_at_kill: list[str]
    survivor_alive: bool
    logs: list[str]
    refused: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, control_plane, seaweed, tiny_base, tiny_mixture) -> Scenario:
    tmp = tmp_path_factory.mktemp("faults")
    staged = stage_inputs(seaweed, tiny_base, tiny_mixture)
    bucket, creds = staged.bucket, staged.creds

    def run(name: str, **changes: Any) -> dict[str, Any]:
        return render_example(bucket=bucket, endpoint=seaweed.endpoint, name=name,
                              changes={"training.maxSteps": 2, **changes})

    no_storage = run("no-storage")
    del no_storage["spec"]["storage"]
    docs = [run("retry"), run("quorum-half", **{"merge.quorum": 0.5, "backoffLimit": 1}),
            run("quorum-full", **{"merge.quorum": 1.0, "backoffLimit": 0}),
            run("bad-spec", **{"data.sources": [{"name": n, "uri": f"s3://{bucket}/{n}.jsonl"}
                                                for n in ("a", "b")],
                               "partitioning": {"strategy": "manual",
                                                "assignments": [["a"], ["ghost"]]}}),
            no_storage,
            # GPUs on an image whose torch has no CUDA (CUDA hidden, so also on a GPU host)
            run("no-cuda", **{"template.resources": {"limits": {"nvidia.com/gpu": 2}},
                              "template.env": [{"name": "CUDA_VISIBLE_DEVICES", "value": ""}],
                              "backoffLimit": 2})]
    del docs[3]["spec"]["data"]["uri"]
    cluster = KubeCluster(control_plane, tmp, prefix="faults").start()
    operators = [OperatorProcess(cluster, env=creds), OperatorProcess(cluster, env=creds)]
    try:
        cluster.start_node(node_options(fail=injected))
        cluster.create_secret("meritrun-storage", creds)
        operators[0].start()
        for doc in docs:
            apply(cluster, doc)
        refused = cluster.kubectl("apply", "-f", "-", check=False, stdin=yaml.safe_dump(
            run("zero-lr", **{"training.learningRate": 0})))
        wait_until(lambda: cluster.get("batch/v1/jobs", "retry-p0-a1"), timeout=120,
                   what="retry's partition Jobs")
        phase_at_kill = cluster.run_status("retry").get("phase", "")
        operators[0].kill()
        jobs_at_kill = sorted(o["metadata"]["name"] for o in cluster.objects("batch/v1/jobs"))
        operators[1].start()
        status = {}
        for name, phases in [("retry", ("Succeeded", "Failed")),
                             ("quorum-half", ("Succeeded", "Failed")),
                             ("quorum-full", ("Failed", "Succeeded")),
                             ("bad-spec", ("Failed",)), ("no-storage", ("Failed",)),
                             ("no-cuda", ("Failed", "Succeeded"))]:
            status[name] = wait_phase(cluster, name, phases, timeout=SCENARIO_TIMEOUT_S)
        survivor_alive = operators[1].proc is not None and operators[1].proc.poll() is None
        return Scenario(status=status, creations=cluster.created("jobs"),
                        events=cluster.objects("v1/events"), phase_at_kill=phase_at_kill,
                        jobs_at_kill=jobs_at_kill, survivor_alive=survivor_alive,
                        logs=[op.log() for op in operators], refused=refused)
    finally:
        for op in operators:
            op.stop()
        cluster.stop()
        seaweed.remove_bucket(bucket)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def events_of(scenario: Scenario, run: str) -> list[dict[str, Any]]:
    return [e for e in scenario.events if e["involvedObject"]["name"] == run]


def test_a_failed_attempt_is_retried_and_the_run_succeeds(scenario):
    st = scenario.status["retry"]
    assert st["phase"] == "Succeeded", st.get("message")
    p1 = next(p for p in st["partitions"] if p["name"] == "p1")
    assert p1["attempt"] == 2 and p1["job"] == "retry-p1-a2"
    assert p1["artifact"]["uri"].endswith("/partitions/p1/attempt-2")
    assert scenario.creations["retry-p1-a1"] == scenario.creations["retry-p1-a2"] == 1
    retrying = [e for e in events_of(scenario, "retry") if e["reason"] == "Retrying"]
    # The stage's own last words (its pod's termination message) explain the retry.
    assert retrying and "injected failure" in retrying[0]["message"]


def test_quorum_half_merges_the_partitions_that_succeeded(scenario):
    st = scenario.status["quorum-half"]
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["merge"]["included"] == ["p0"] and st["merge"]["leftOut"] == ["p1"]
    p1 = next(p for p in st["partitions"] if p["name"] == "p1")
    assert p1["state"] == "Failed" and p1["attempt"] == 2  # backoffLimit 1: two attempts
    assert st["modelUri"]


def test_quorum_full_fails_with_a_clear_condition(scenario):
    st = scenario.status["quorum-full"]
    assert st["phase"] == "Failed"
    failed = conditions(st)["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "QuorumNotMet"
    assert "p1" in failed["message"] and "quorum 1.0" in failed["message"]
    assert "quorum-full-merge-a1" not in scenario.creations


@pytest.mark.parametrize(("run", "message"), [
    ("bad-spec", "spec: partitioning.assignments[1]: 'ghost' is not a data.sources[].name"),
    ("no-storage", "spec.storage: Field required"),
])
def test_a_bad_spec_gets_a_condition_not_a_crash(scenario, run, message):
    st = scenario.status[run]
    assert st["phase"] == "Failed"
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith(message)
    assert failed["observedGeneration"] == 1
    assert not [j for j in scenario.creations if j.startswith(f"{run}-")]
    warnings = [e for e in events_of(scenario, run) if e["reason"] == "InvalidSpec"]
    assert warnings and warnings[0]["type"] == "Warning"
    # ...and the operator kept serving the others.
    assert scenario.survivor_alive
    assert scenario.status["retry"]["phase"] == "Succeeded"


def test_gpus_the_image_cannot_use_fail_the_run_invalid_spec_without_a_retry(scenario):
    """The train stage (under merit_trainer.launch: 2 GPUs) exits INVALID_SPEC; the pod's
    exit code and last words reach the run as InvalidSpec, not as a crash to retry."""
    st = scenario.status["no-cuda"]
    failed = conditions(st)["Failed"]
    assert (st["phase"], failed["reason"]) == ("Failed", "InvalidSpec"), failed
    assert 'spec.template.resources.limits["nvidia.com/gpu"]: 2 GPU(s)' in failed["message"]
    trained = [j for j in scenario.creations if j.startswith("no-cuda-p")]
    assert trained and all(j.endswith("-a1") for j in trained)  # backoffLimit 2, no retry


def test_a_restarted_operator_resumes_without_duplicate_jobs(scenario):
    assert scenario.phase_at_kill in ("Profiling", "Training")
    assert "retry-p0-a1" in scenario.jobs_at_kill
    duplicated = {name: n for name, n in scenario.creations.items() if n != 1}
    assert not duplicated, f"Jobs created more than once: {duplicated}"
    assert scenario.creations.keys() >= {"retry-profile-a1", "retry-p0-a1", "retry-merge-a1",
                                         "quorum-half-merge-a1"}


def test_operators_logged_no_exception(scenario):
    for log in scenario.logs:
        assert log and "Traceback" not in log, log[-3000:]


def test_a_schema_violation_is_refused_at_admission(scenario):
    assert scenario.refused.returncode != 0
    assert "spec.training.learningRate" in scenario.refused.stderr
    assert "zero-lr" not in scenario.status and not [
        j for j in scenario.creations if j.startswith("zero-lr-")]
