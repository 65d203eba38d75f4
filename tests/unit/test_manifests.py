"""The operator's pure pieces: child manifests, Job observations, status patches, settings."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from merit_operator.manifests import (
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_PARTITION,
    LABEL_RUN,
    LABEL_RUN_UID,
    LABEL_STAGE,
    PARAMS_DIR,
    PARAMS_KEY,
    PARAMS_SHARED_BYTES,
    Images,
    RunRef,
    build_params_configmaps,
    build_stage_job,
    job_observation,
)
from merit_operator.settings import Settings
from merit_operator.status import (
    merge_patch,
    next_delay,
    validated_spec,
)
from meritrun.api import MeritRunSpec, MeritRunStatus, PartitionStatus, PlanSummary
from meritrun.artifacts import RunId
from meritrun.errors import SpecError
from meritrun.jobs import merge_job, profile_job, train_job, verify_job

RUN = RunRef(name="demo", namespace="ml", uid="1111-2222")
RUN_ID = RunId("demo", "1111-2222")
IMAGES = Images(trainer="trainer:1", merger="merger:1")
SECRET_VALUE = "s3cr3t-value-never-in-manifests"


def make_spec(**template) -> MeritRunSpec:
    return MeritRunSpec.model_validate({
        "baseModel": {"uri": "s3://b/base"}, "data": {"uri": "s3://b/d.jsonl"},
        "storage": {"endpoint": "http://minio:9000", "bucket": "bkt",
                    "secretRef": {"name": "creds"}},
        "template": template, "activeDeadlineSeconds": 7200})


def partition() -> PartitionStatus:
    return PartitionStatus(name="p1", index=1, sources=["a", "b"])


def train(spec: MeritRunSpec, attempt: int = 2):
    return train_job(RUN_ID, spec, partition(), attempt)


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_job_has_deterministic_name_labels_and_owner():
    job = build_stage_job(train(make_spec()), run=RUN, spec=make_spec(), images=IMAGES)
    meta = job["metadata"]
    assert meta["name"] == "demo-p1-a2" and meta["namespace"] == "ml"
    assert meta["labels"] == {LABEL_RUN: "demo", LABEL_RUN_UID: "1111-2222",
                              LABEL_STAGE: "train", LABEL_PARTITION: "p1", LABEL_ATTEMPT: "2",
                              "app.kubernetes.io/managed-by": "meritrun-operator"}
    (owner,) = meta["ownerReferences"]
    assert owner == {"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "name": "demo",
                     "uid": "1111-2222", "controller": True, "blockOwnerDeletion": True}
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]


def test_job_retries_are_ours_and_bounded_in_time():
    job = build_stage_job(train(make_spec()), run=RUN, spec=make_spec(), images=IMAGES)
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert "suspend" not in job["spec"]


def test_command_reads_params_from_the_mounted_configmap():
    spec = make_spec()
    action = train(spec)
    job = build_stage_job(action, run=RUN, spec=spec, images=IMAGES)
    c = container(job)
    assert c["command"][:4] == ["python", "-m", "merit_trainer.stage", "train"]
    assert c["command"][4:6] == ["--params", f"{PARAMS_DIR}/{PARAMS_KEY}"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[PARAMS_DIR]]["configMap"] == {
        "name": "demo-train-a2-params", "items": [{"key": "demo-p1-a2.json", "path": PARAMS_KEY}]}
    (cm,) = build_params_configmaps([action], run=RUN)
    assert cm["metadata"]["name"] == "demo-train-a2-params"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == RUN.uid
    params = json.loads(cm["data"]["demo-p1-a2.json"])
    assert params["output"] == "runs/demo/1111-2222/partitions/p1/attempt-2"
    assert (params["run"], params["run_uid"]) == ("demo", "1111-2222")
    assert params["partition"] == "p1" and params["attempt"] == 2


def test_a_stage_attempts_jobs_share_one_params_configmap_each_reading_its_own_key():
    """A round's K partitions cost one ConfigMap write, not K; each pod mounts its own key
    only, so no stage reads another's params."""
    spec = make_spec()
    jobs = [train_job(RUN_ID, spec, PartitionStatus(name=f"p{i}", index=i, sources=[f"s{i}"]),
                      1) for i in range(3)]
    (cm,) = build_params_configmaps(jobs, run=RUN)
    assert cm["metadata"]["name"] == "demo-train-a1-params"
    assert LABEL_PARTITION not in cm["metadata"]["labels"]
    assert cm["metadata"]["labels"][LABEL_ATTEMPT] == "1"
    for i, action in enumerate(jobs):
        assert json.loads(cm["data"][f"demo-p{i}-a1.json"])["sources"] == [f"s{i}"]
        pod = build_stage_job(action, run=RUN, spec=spec, images=IMAGES)["spec"]["template"]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "params"]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert volume["configMap"]["items"] == [{"key": f"demo-p{i}-a1.json",
                                                 "path": PARAMS_KEY}]
    # A retry (attempt 2) goes to the next attempt's ConfigMap; the profile to its own.
    retry = train_job(RUN_ID, spec, PartitionStatus(name="p1", index=1, sources=["s1"]), 2)
    names = [c["metadata"]["name"] for c in build_params_configmaps(
        [retry, profile_job(RUN_ID, spec, 1)], run=RUN)]
    assert names == ["demo-train-a2-params", "demo-profile-a1-params"]


def test_a_job_with_large_params_has_its_own_configmap():
    """64 Jobs of up to PARAMS_SHARED_BYTES each keep a shared ConfigMap under the API's
    1 MiB; a larger one stands alone."""
    spec = make_spec()
    big = train_job(RUN_ID, spec, PartitionStatus(
        name="p9", index=9, sources=[f"source-{i:04d}-" + "x" * 100
                                     for i in range(PARAMS_SHARED_BYTES // 100)]), 1)
    small = train(spec, attempt=1)
    configmaps = {c["metadata"]["name"]: c for c in build_params_configmaps([small, big],
                                                                            run=RUN)}
    assert set(configmaps) == {"demo-train-a1-params", "demo-p9-a1-params"}
    assert list(configmaps["demo-p9-a1-params"]["data"]) == ["demo-p9-a1.json"]
    assert configmaps["demo-p9-a1-params"]["metadata"]["labels"][LABEL_PARTITION] == "p9"
    pod = build_stage_job(big, run=RUN, spec=spec, images=IMAGES)["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "demo-p9-a1-params"


def test_checkpoints_go_to_storage_unless_a_work_volume_keeps_them():
    """An emptyDir dies with the pod: the next attempt resumes from storage instead."""
    assert train(make_spec()).params.checkpoints == "runs/demo/1111-2222/partitions/p1/checkpoints"
    assert train(make_spec(), attempt=3).params.checkpoints == train(make_spec()).params.checkpoints
    assert train(make_spec(workVolume="meritrun-work")).params.checkpoints is None


def test_a_gang_pods_spec_verdict_outranks_the_others_exits():
    from merit_operator.backend import termination_reason

    def pod(code: int, message: str = "") -> dict:
        return {"status": {"containerStatuses": [
            {"state": {"terminated": {"exitCode": code, "message": message}}}]}}

    why = 'MERITRUN_ERROR: spec.template.resources.limits["nvidia.com/gpu"]: 8 GPU(s) requested'
    assert termination_reason([pod(137), pod(5, why), pod(4)]) == (why.split(": ", 1)[1], 5)
    assert termination_reason([pod(1), pod(4)])[1] == 4
    assert termination_reason([]) == (None, None)


def test_credentials_only_by_secret_reference():
    spec = make_spec(env=[{"name": "EXTRA", "value": "1"}])
    job = build_stage_job(train(spec), run=RUN, spec=spec, images=IMAGES)
    env = {e["name"]: e for e in container(job)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "creds",
                                                                         "key": key}}}
    assert env["EXTRA"]["value"] == "1"
    (cm,) = build_params_configmaps([train(spec)], run=RUN)
    text = json.dumps([job, cm])
    assert "secretAccessKey" not in text and SECRET_VALUE not in text
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_template_fields_reach_the_pod():
    spec = make_spec(image="my/trainer:2", mergeImage="my/merger:2", serviceAccountName="sa",
                     nodeSelector={"gpu": "a100"}, tolerations=[{"key": "gpu",
                                                                 "operator": "Exists"}],
                     resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}})
    job = build_stage_job(train(spec), run=RUN, spec=spec, images=IMAGES)
    pod = job["spec"]["template"]["spec"]
    assert container(job)["image"] == "my/trainer:2"
    assert container(job)["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "8Gi"}
    assert pod["serviceAccountName"] == "sa" and pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    merge = build_stage_job(merge_job(RUN_ID, spec, [partition()], 1), run=RUN, spec=spec,
                            images=IMAGES)
    assert container(merge)["image"] == "my/merger:2"
    # The merge streams tensors on CPUs: no GPU is held for it.
    assert container(merge)["resources"]["limits"] == {"memory": "8Gi"}
    assert container(merge)["command"][2:4] == ["merit_merger.stage", "merge"]
    # So does the check of a pull site's contribution, with the merger image.
    verify = build_stage_job(verify_job(RUN_ID, spec, partition(), 1), run=RUN, spec=spec,
                             images=IMAGES)
    assert container(verify)["image"] == "my/merger:2"
    assert container(verify)["resources"]["limits"] == {"memory": "8Gi"}
    assert container(verify)["command"][2:4] == ["merit_merger.stage", "verify"]


def test_default_images_come_from_the_settings():
    spec = make_spec()
    profile = build_stage_job(profile_job(RUN_ID, spec, 1), run=RUN, spec=spec, images=IMAGES)
    merge = build_stage_job(merge_job(RUN_ID, spec, [partition()], 1), run=RUN, spec=spec,
                            images=IMAGES)
    assert container(profile)["image"] == "trainer:1"
    assert container(merge)["image"] == "merger:1"
    assert "resources" not in container(profile)


def test_kueue_queue_label_suspends_the_job_for_admission():
    spec = make_spec(queueName="team-a")
    job = build_stage_job(train(spec), run=RUN, spec=spec, images=IMAGES)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True
    plain = build_stage_job(train(make_spec()), run=RUN, spec=make_spec(), images=IMAGES)
    assert KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]


def test_remote_children_carry_no_owner_reference():
    spec = make_spec()
    job = build_stage_job(train(spec), run=RUN, spec=spec, images=IMAGES, owned=False)
    assert "ownerReferences" not in job["metadata"]
    assert job["metadata"]["labels"][LABEL_RUN_UID] == RUN.uid


@pytest.mark.parametrize(("conditions", "state", "message"), [
    ([], "Active", None),
    ([{"type": "Complete", "status": "True"}], "Succeeded", None),
    ([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}],
     "Failed", "DeadlineExceeded: too long"),
    ([{"type": "Failed", "status": "False"}], "Active", None),
])
def test_job_observation(conditions, state, message):
    seen = job_observation({"status": {"conditions": conditions}})
    assert (seen.state, seen.message) == (state, message)


def test_merge_patch_nulls_what_disappeared_and_replaces_lists():
    old = {"phase": "Training", "retryAfter": "x", "merge": {"state": "Pending", "attempt": 0},
           "partitions": [{"name": "p0"}]}
    new = {"phase": "Training", "merge": {"state": "Running", "attempt": 1},
           "partitions": [{"name": "p0", "state": "Running"}]}
    assert merge_patch(old, new) == {"retryAfter": None, "merge": {"state": "Running",
                                                                   "attempt": 1},
                                     "partitions": [{"name": "p0", "state": "Running"}]}
    assert merge_patch(new, new) is None


def test_invalid_spec_names_the_field_path():
    body = {"metadata": {"name": "demo"}, "spec": {"baseModel": {"uri": "s3://b/m"},
                                                   "data": {"uri": "s3://b/d"},
                                                   "storage": {"bucket": "bkt"},
                                                   "training": {"learningRate": -1}}}
    with pytest.raises(SpecError) as caught:
        validated_spec(body)
    assert str(caught.value) == "spec.training.learningRate: Input should be greater than 0"


@pytest.mark.parametrize(("change", "path"), [
    ({"storage": None}, "spec.storage"),
    ({"storage": {"uri": "file:///tmp/x"}}, "spec.storage.uri"),
])
def test_kubernetes_runs_need_s3_storage(change, path):
    spec = {"baseModel": {"uri": "s3://b/m"}, "data": {"uri": "s3://b/d"}, **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(SpecError) as caught:
        validated_spec({"metadata": {"name": "demo"}, "spec": spec})
    assert caught.value.path == path


def test_next_delay_wakes_when_a_backoff_ends():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    st = MeritRunStatus(phase="Training", partitions=[PartitionStatus(
        name="p0", index=0, sources=["a"], state="BackingOff",
        retry_after=(now + timedelta(seconds=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))])
    due = step_decision_requeue(st, now)
    assert next_delay(st, requeue_after=due, resync_seconds=30,
                      idle_seconds=600) == pytest.approx(7.05)
    st.phase = "Succeeded"
    assert next_delay(st, requeue_after=None, resync_seconds=30, idle_seconds=600) == 600


def step_decision_requeue(st, now):
    from meritrun.pipeline import Observed, decide

    spec = MeritRunSpec.model_validate({"baseModel": {"uri": "s3://b/m"},
                                        "data": {"uri": "s3://b/d"},
                                        "storage": {"bucket": "merit"}})
    st = st.model_copy(update={"plan": PlanSummary(strategy="random", partitions=1),
                               "start_time": "2026-01-01T00:00:00Z"})
    return decide(spec, st, Observed(run=RUN_ID, now=now)).requeue_after


def test_settings_from_env_with_units_and_errors():
    s = Settings.from_env({"MERITRUN_NAMESPACES": "a, b", "MERITRUN_RESYNC_SECONDS": "2.5",
                           "MERITRUN_WORKERS": "3", "MERITRUN_TRAINER_IMAGE": "t:1"})
    assert s.namespaces == ("a", "b") and s.resync_seconds == 2.5 and s.workers == 3
    assert s.trainer_image == "t:1" and Settings.from_env({}) == Settings()
    with pytest.raises(SpecError, match="MERITRUN_WORKERS"):
        Settings.from_env({"MERITRUN_WORKERS": "many"})
    with pytest.raises(SpecError, match="MERITRUN_RESYNC_SECONDS"):
        Settings.from_env({"MERITRUN_RESYNC_SECONDS": "-1"})


def test_the_operator_imports_neither_torch_nor_the_images():
    import subprocess
    import sys

    code = ("import sys, merit_operator.handlers, merit_operator.__main__; "
            "bad = [m for m in ('torch', 'transformers', 'merit_trainer', 'merit_merger') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubeconfig_for_remote_sites_parses_and_hides_its_secrets():
    import base64

    from merit_operator.kubeapi import ApiConfig
    from meritrun.errors import MeritRunError

    pem = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    doc = {"current-context": "site", "contexts": [
        {"name": "site", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "c", "cluster": {
            "server": "https://site-b:6443/",
            "certificate-authority-data": base64.b64encode(pem.encode()).decode()}}],
        "users": [{"name": "u", "user": {"token": SECRET_VALUE}}]}
    config = ApiConfig.from_kubeconfig(doc)
    assert (config.server, config.namespace, config.ca_pem) == ("https://site-b:6443", "team",
                                                                pem)
    assert config.token == SECRET_VALUE and SECRET_VALUE not in repr(config)
    doc["users"][0]["user"] = {"exec": {"command": "aws"}}
    with pytest.raises(MeritRunError, match="exec"):
        ApiConfig.from_kubeconfig(doc)
