"""A two-node partition on the real control plane: rendezvous, one artifact, a dying pod.

One MeritRun with `training.nodes: 2` (one partition, a few steps, checkpoints every 2 steps
on a work volume claim) through the operator, the real Job controller and the node stand-in
(support.kubelet), which runs each pod's `torchrun --nnodes=2 --node_rank=$(NODE_RANK)
--master_addr=<job>-0.<job>` as written: NODE_RANK from the completion-index annotation
(fieldRef), `$(...)` expanded, and the rendezvous host's DNS name resolved to the one pod
address here (support.podenv says how that stands in for cluster DNS). The gang meets on a
free port (the operator's MERITRUN_RENDEZVOUS_PORT), each pod one gloo process.

As soon as the first attempt's first checkpoint is in place, pod 1's processes are SIGKILLed
(an OOM kill or a dead node, exit 137). podFailurePolicy fails that Job at once; the pipeline
retries the partition once (attempt 2), whose two pods rendezvous again, resume from the
checkpoint on the shared claim (both ranks log it; the published loss curve still has every
step) and publish one artifact, written by rank 0 alone; the merge then succeeds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.kube import KubeCluster, OperatorProcess, free_port
from support.kube_e2e import apply, node_options, render_example, stage_inputs, wait_phase

pytestmark = pytest.mark.slow
RUN, CLAIM = "gang", "gang-work"
STEPS, CHECKPOINT_EVERY = 10, 2
INDEX = "batch.kubernetes.io/job-completion-index"
TIMEOUT_S = 300.0


@dataclass
class Gang:
    status: dict[str, Any]
    creations: dict[str, int]
    jobs: dict[str, dict[str, Any]]
    pods: dict[str, list[dict[str, Any]]]  # job -> its pods by completion index
    logs: dict[str, str]  # pod name -> log
    killed: str
    checkpoint_at_kill: int
    keys: list[str]
    manifest: dict[str, Any]
    train_log: dict[str, Any]
    operator_log: str
    checkpoints_left: list[str]
    events: list[dict[str, Any]]
    services: list[str] = field(default_factory=list)


def kill_after_first_checkpoint(cluster: KubeCluster, claim: Path, job: str
                                ) -> tuple[str, int]:
    """SIGKILL pod 1 of `job` once a complete checkpoint is on the claim; (pod, its step)."""
    node = cluster.plane.node
    assert node is not None
    deadline, next_look = time.monotonic() + TIMEOUT_S, 0.0
    while time.monotonic() < deadline:
        if time.monotonic() > next_look:  # the run ended without the checkpoint: give up
            next_look = time.monotonic() + 1.0
            if cluster.run_status(RUN).get("phase") in ("Succeeded", "Failed"):
                break
        steps = sorted(claim.glob(f"{RUN}/p0/checkpoints/*/step-*/meta.json"))
        if steps:
            pod = next(p["metadata"]["name"] for p in cluster.objects("v1/pods")
                       if p["metadata"]["labels"].get("job-name") == job
                       and p["metadata"]["annotations"].get(INDEX) == "1")
            if node.kill(cluster.namespace, pod):
                return pod, int(steps[-1].parent.name.removeprefix("step-"))
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {job} appeared; run: {cluster.run_status(RUN)}")


@pytest.fixture(scope="module")
def gang(tmp_path_factory, control_plane, seaweed, tiny_base, tiny_mixture) -> Gang:
    tmp = tmp_path_factory.mktemp("gang")
    staged = stage_inputs(seaweed, tiny_base, tiny_mixture)
    bucket, storage, creds = staged.bucket, staged.storage, staged.creds
    cluster = KubeCluster(control_plane, tmp, prefix="gang").start()
    operator = OperatorProcess(cluster, env={**creds,
                                             "MERITRUN_RENDEZVOUS_PORT": str(free_port())})
    try:
        cluster.start_node(node_options())
        cluster.create_secret("meritrun-storage", creds)
        cluster.plane.api.create(f"/api/v1/namespaces/{cluster.namespace}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": "1Gi"}}}})
        operator.start()
        apply(cluster, render_example(bucket=bucket, endpoint=seaweed.endpoint, name=RUN, changes={
            "partitioning.partitions": 1, "training.nodes": 2, "training.maxSteps": STEPS,
            "template.workVolume": CLAIM,
            "template.env": [{"name": "MERITRUN_CHECKPOINT_STEPS",
                              "value": str(CHECKPOINT_EVERY)}]}))
        claim = cluster.plane.node.claim_folder(cluster.namespace, CLAIM)
        killed, step = kill_after_first_checkpoint(cluster, claim, f"{RUN}-p0-a1")
        status = wait_phase(cluster, RUN, ("Succeeded", "Failed"), timeout=TIMEOUT_S)
        pods: dict[str, list[dict[str, Any]]] = {}
        for p in cluster.objects("v1/pods"):
            job = p["metadata"]["labels"].get("job-name", "")
            pods.setdefault(job, []).append(p)
        for group in pods.values():
            group.sort(key=lambda p: p["metadata"].get("annotations", {}).get(INDEX, ""))
        uid = status["runUid"]
        keys = storage.list_keys(f"runs/{RUN}/{uid}/")
        manifest_key = next((k for k in keys
                             if k.endswith("/partitions/p0/attempt-2/manifest.json")), None)
        manifest = json.loads(storage.get_bytes(manifest_key)) if manifest_key else {}
        log_key = manifest_key and manifest_key.replace("manifest.json", "train_log.json")
        return Gang(
            status=status, creations=cluster.created("jobs"),
            jobs={j["metadata"]["name"]: j for j in cluster.objects("batch/v1/jobs")},
            pods=pods, killed=killed, checkpoint_at_kill=step,
            logs={p["metadata"]["name"]: cluster.plane.node.log(cluster.namespace,
                                                                p["metadata"]["name"])
                  for group in pods.values() for p in group},
            keys=keys, manifest=manifest,
            train_log=json.loads(storage.get_bytes(log_key)) if log_key else {},
            operator_log=operator.log(),
            checkpoints_left=[str(c) for c in claim.glob(f"{RUN}/p0/checkpoints/*/*")],
            events=cluster.objects("v1/events"),
            services=[s["metadata"]["name"] for s in cluster.objects("v1/services")])
    finally:
        operator.stop()
        cluster.stop()
        seaweed.remove_bucket(bucket)


def test_the_run_succeeds_after_one_retry_of_the_gang(gang):
    st = gang.status
    assert st["phase"] == "Succeeded", st.get("message")
    (part,) = st["partitions"]
    assert part["state"] == "Succeeded" and part["attempt"] == 2
    assert st["merge"]["included"] == ["p0"] and st["modelUri"]
    # The dying pod spent one attempt of backoffLimit 2: one Job per attempt, each created once.
    assert gang.creations == {f"{RUN}-profile-a1": 1, f"{RUN}-p0-a1": 1, f"{RUN}-p0-a2": 1,
                              f"{RUN}-merge-a1": 1}
    assert set(gang.services) >= {f"{RUN}-p0-a1", f"{RUN}-p0-a2"}


def test_a_dying_pod_fails_its_attempt_through_the_pod_failure_policy(gang):
    failed = {c["type"]: c for c in gang.jobs[f"{RUN}-p0-a1"]["status"]["conditions"]}
    assert failed["Failed"]["status"] == "True"
    assert failed["Failed"]["reason"] == "PodFailurePolicy"
    killed = next(p for p in gang.pods[f"{RUN}-p0-a1"] if p["metadata"]["name"] == gang.killed)
    (cs,) = killed["status"]["containerStatuses"]
    assert cs["state"]["terminated"]["exitCode"] == 137
    assert 0 < gang.checkpoint_at_kill < STEPS
    # The run says which pod died and how, not what its peer saw next (a connection reset).
    (retry,) = [e["message"] for e in gang.events if e["reason"] == "Retrying"
                and e["involvedObject"]["name"] == RUN]
    assert gang.killed in retry and "exit code 137" in retry, retry
    assert "Connection reset" not in retry


def test_the_job_controller_made_an_indexed_gang_the_node_resolved(gang):
    pods = gang.pods[f"{RUN}-p0-a2"]
    assert [p["metadata"]["annotations"][INDEX] for p in pods] == ["0", "1"]
    for i, p in enumerate(pods):
        assert p["spec"]["hostname"] == f"{RUN}-p0-a2-{i}"
        assert p["spec"]["subdomain"] == f"{RUN}-p0-a2"
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        # The Job controller's own variable, next to ours (both read the annotation).
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
            f"['{INDEX}']")
        assert p["status"]["phase"] == "Succeeded"


def test_both_pods_rendezvoused_and_resumed_from_the_checkpoint(gang):
    for p in gang.pods[f"{RUN}-p0-a2"]:
        log = gang.logs[p["metadata"]["name"]]
        assert "on 2 process(es)" in log, log[-3000:]
        assert "resuming from checkpoint" in log, log[-3000:]
        resumed_at = int(re.search(r"resuming from checkpoint \S+ at step (\d+)", log)[1])
        assert gang.checkpoint_at_kill <= resumed_at < STEPS


def test_rank_0_alone_published_one_artifact_with_every_step(gang):
    rank0, rank1 = (gang.logs[p["metadata"]["name"]] for p in gang.pods[f"{RUN}-p0-a2"])
    assert "partition p0 attempt 2 published to" in rank0
    assert "published to" not in rank1 and "uploaded" not in rank1
    manifests = [k for k in gang.keys if k.endswith("manifest.json") and "/p0/" in k]
    assert len(manifests) == 1 and "/attempt-2/" in manifests[0], manifests
    m = gang.manifest
    assert m["attempt"] == 2 and m["training"]["processes"] == 2
    assert m["training"]["steps"] == STEPS and m["tokens"]["supervised"] > 0
    # The curve of the resumed attempt starts at step 1: the checkpoint carried the losses.
    assert len(gang.train_log["loss"]) == STEPS and gang.train_log["processes"] == 2
    # The checkpoints go once the artifact is published.
    assert gang.checkpoints_left == []


def test_the_operator_logged_no_exception(gang):
    assert "Traceback" not in gang.operator_log, gang.operator_log[-3000:]
