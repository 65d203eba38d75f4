"""Train Jobs on several GPUs and nodes: torchrun lines, the Indexed gang, its Service, shm.

Every rendered object is also checked against the Kubernetes 1.30 OpenAPI schema
(kubernetes-validate, strict: an unknown or misspelt field fails).
"""

from __future__ import annotations

import kubernetes_validate
import pytest

from merit_operator.gang import COMPLETION_INDEX, JOB_NAME_LABEL
from merit_operator.manifests import (
    KUEUE_QUEUE_LABEL,
    Images,
    RunRef,
    build_rendezvous_service,
    build_stage_job,
)
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import RunId
from meritrun.jobs import merge_job, profile_job, train_job

RUN = RunRef(name="demo", namespace="ml", uid="1111-2222")
IMAGES = Images(trainer="trainer:1", merger="merger:1")
K8S = "1.30.0"


def make_spec(*, gpus: int | None = None, nodes: int = 1, **template) -> MeritRunSpec:
    if gpus is not None:
        template["resources"] = {"limits": {"nvidia.com/gpu": gpus, "memory": "64Gi"}}
    return MeritRunSpec.model_validate({
        "baseModel": {"uri": "s3://b/base"}, "data": {"uri": "s3://b/d.jsonl"},
        "storage": {"endpoint": "http://minio:9000", "bucket": "bkt"},
        "training": {"nodes": nodes}, "template": template})


def render(spec: MeritRunSpec, stage: str = "train", images: Images = IMAGES) -> dict:
    part = PartitionStatus(name="p0", index=0, sources=["a"])
    action = {"train": lambda: train_job(RunId("demo", "u-1"), spec, part, 1),
              "profile": lambda: profile_job(RunId("demo", "u-1"), spec, 1),
              "merge": lambda: merge_job(RunId("demo", "u-1"), spec, [part], 1)}[stage]()
    job = build_stage_job(action, run=RUN, spec=spec, images=images)
    kubernetes_validate.validate(job, K8S, strict=True)
    service = build_rendezvous_service(action, run=RUN, spec=spec, images=images)
    if service is not None:
        kubernetes_validate.validate(service, K8S, strict=True)
    return {"job": job, "service": service, "pod": job["spec"]["template"]["spec"]}


def command(rendered: dict) -> list[str]:
    return rendered["pod"]["containers"][0]["command"]


def has_shm(rendered: dict) -> bool:
    pod = rendered["pod"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    return "/dev/shm" in mounts and volumes[mounts["/dev/shm"]]["emptyDir"] == {
        "medium": "Memory"}


def test_one_gpu_keeps_the_plain_command_and_one_pod():
    r = render(make_spec(gpus=1))
    assert command(r)[:4] == ["python", "-m", "merit_trainer.stage", "train"]
    assert r["service"] is None and not has_shm(r)
    assert (r["job"]["spec"]["completions"], r["job"]["spec"]["parallelism"]) == (1, 1)
    env = {e["name"]: e.get("value") for e in r["pod"]["containers"][0]["env"]}
    assert env["MERITRUN_GPUS"] == "1"


def test_one_pod_with_n_gpus_runs_torchrun_standalone_with_shm():
    r = render(make_spec(gpus=8))
    cmd = command(r)
    assert cmd[:6] == ["python", "-m", "merit_trainer.launch", "--nproc_per_node", "8",
                       "--standalone"]
    assert cmd[6:10] == ["-m", "merit_trainer.stage", "train", "--params"]
    assert cmd[-2:] == ["--workdir", "/work"]
    assert has_shm(r) and r["service"] is None
    assert "completionMode" not in r["job"]["spec"]


def test_several_nodes_make_an_indexed_gang_behind_a_headless_service():
    r = render(make_spec(gpus=4, nodes=3, queueName="gpu-queue"))
    spec, job_name = r["job"]["spec"], r["job"]["metadata"]["name"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (3, 3, "Indexed")
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}} in rules
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # Kueue admits the Job as one workload: all three pods or none.
    assert r["job"]["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert spec["suspend"] is True
    cmd = command(r)
    assert "--nproc_per_node" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert "--nnodes=3" in cmd and "--node_rank=$(NODE_RANK)" in cmd
    assert f"--master_addr={job_name}-0.{job_name}" in cmd and "--standalone" not in cmd
    env = {e["name"]: e for e in r["pod"]["containers"][0]["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    assert r["pod"]["subdomain"] == job_name and has_shm(r)
    service = r["service"]
    assert service["metadata"]["name"] == job_name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {JOB_NAME_LABEL: job_name}
    assert service["metadata"]["ownerReferences"][0]["uid"] == RUN.uid


def test_the_rendezvous_port_is_the_operators_setting_in_command_and_service():
    assert "--master_port=29500" in command(render(make_spec(nodes=2)))
    r = render(make_spec(nodes=2), images=Images(trainer="t:1", merger="m:1",
                                                 rendezvous_port=31555))
    assert "--master_port=31555" in command(r)
    assert r["service"]["spec"]["ports"] == [{"name": "rendezvous", "port": 31555}]


def test_a_cpu_gang_runs_one_process_per_pod():
    r = render(make_spec(nodes=2))
    cmd = command(r)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "1" and "--nnodes=2" in cmd
    assert "MERITRUN_GPUS" not in {e["name"] for e in r["pod"]["containers"][0]["env"]}


@pytest.mark.parametrize("stage", ["profile", "merge"])
def test_other_stages_keep_one_pod_and_one_process(stage):
    r = render(make_spec(gpus=8, nodes=4), stage)
    assert r["service"] is None and not has_shm(r)
    assert r["job"]["spec"]["completions"] == 1 and "completionMode" not in r["job"]["spec"]
    assert command(r)[1:3] == ["-m", f"merit_{'merger' if stage == 'merge' else 'trainer'}.stage"]


def test_work_volume_claim_replaces_the_empty_dir_with_a_directory_per_partition():
    r = render(make_spec(workVolume="meritrun-work"))
    volumes = {v["name"]: v for v in r["pod"]["volumes"]}
    assert volumes["work"] == {"name": "work",
                               "persistentVolumeClaim": {"claimName": "meritrun-work"}}
    mount = next(m for m in r["pod"]["containers"][0]["volumeMounts"] if m["name"] == "work")
    assert mount == {"name": "work", "mountPath": "/work", "subPath": "demo/p0"}
    assert {v["name"]: v for v in render(make_spec())["pod"]["volumes"]}["work"] == {
        "name": "work", "emptyDir": {}}


@pytest.mark.parametrize(("training", "field"), [
    ({"nodes": 0}, "nodes"),
    ({"batchSize": 8, "microBatchSize": 3}, "microBatchSize"),
    ({"batchSize": 4, "microBatchSize": 8}, "microBatchSize"),
    ({"maxGradNorm": 0}, "maxGradNorm"),
    ({"schedule": "step"}, "schedule"),
])
def test_bad_training_fields_are_refused_by_name(training, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        MeritRunSpec.model_validate({"baseModel": {"uri": "s3://b/base"},
                                     "data": {"uri": "s3://b/d.jsonl"}, "training": training})
