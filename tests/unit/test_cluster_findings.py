"""What a real cluster showed, in pure form: drains, held Jobs, stuck pods, a rolled-back
operator reading a newer status, rotating tokens, and the Lease that picks one actor."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from support.decide import make_spec as pipeline_spec
from support.decide import step

from merit_operator.login import connection_info
from merit_operator.manifests import (
    KUEUE_QUEUE_LABEL,
    Images,
    RunRef,
    build_stage_job,
    job_observation,
    pod_waiting_reason,
)
from merit_operator.settings import Settings
from merit_operator.status import parse_status
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import RunId
from meritrun.errors import SpecError
from meritrun.jobs import train_job
from meritrun.pipeline import JobObservation

RUN = RunRef(name="demo", namespace="ml", uid="u-1")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _job(**template) -> dict:
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": "s3://b/base"}, "data": {"uri": "s3://b/d.jsonl"},
        "storage": {"endpoint": "http://s3:9000", "bucket": "bkt"}, "template": template})
    part = PartitionStatus(name="p0", index=0, sources=["a"])
    return build_stage_job(train_job(RunId("demo", "u-1"), spec, part, 1), run=RUN, spec=spec,
                           images=Images(trainer="t:1", merger="m:1"))


def test_a_drained_pod_does_not_spend_the_attempt():
    spec = _job()["spec"]
    assert spec["podFailurePolicy"] == {"rules": [
        {"action": "Ignore",
         "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    # (status: required by the API up to 1.34.) The replacement starts only once the
    # evicted pod is terminal: never two writers
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["restartPolicy"] == "Never"


def test_a_job_held_by_its_queue_says_so():
    job = _job(queueName="gpu")
    assert job["spec"]["suspend"] is True
    seen = job_observation(job)
    assert seen.state == "Active" and "not admitted by queue 'gpu'" in seen.waiting
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu"
    assert job_observation(_job()).waiting is None


def _pod(waiting: dict | None = None, conditions: list | None = None) -> dict:
    statuses = [{"name": "stage", "state": {"waiting": waiting}}] if waiting else []
    return {"status": {"phase": "Pending", "containerStatuses": statuses,
                       "conditions": conditions or []}}


@pytest.mark.parametrize(("pod", "reason"), [
    (_pod({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:1"'}),
     'ImagePullBackOff: Back-off pulling image "x:1"'),
    (_pod({"reason": "CreateContainerConfigError", "message": 'secret "creds" not found'}),
     'CreateContainerConfigError: secret "creds" not found'),
    (_pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": "0/1 nodes: Insufficient nvidia.com/gpu"}]),
     "Unschedulable: 0/1 nodes: Insufficient nvidia.com/gpu"),
    (_pod({"reason": "ContainerCreating"}), None),  # a normal step, not stuck
    (_pod(), None),
])
def test_stuck_pod_reasons(pod, reason):
    assert pod_waiting_reason(pod) == reason


def test_the_pipeline_shows_a_waiting_job_once_and_clears_it():
    spec = pipeline_spec()
    first = step(spec, None)
    held = JobObservation("Active", waiting="ImagePullBackOff: no such image")
    d = step(spec, first.status, jobs={"r-profile-a1": held})
    assert d.status.profile.waiting == "ImagePullBackOff: no such image"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "JobWaiting")]
    again = step(spec, d.status, jobs={"r-profile-a1": held})
    assert again.events == () and again.status.profile.waiting  # no repeated event
    moving = step(spec, again.status, jobs={"r-profile-a1": JobObservation("Active")})
    assert moving.status.profile.waiting is None


def test_an_older_operator_reads_a_newer_status():
    raw = {"phase": "Training", "fromTheFuture": {"x": 1},
           "merge": {"state": "Running", "attempt": 1, "newerField": True},
           "conditions": [{"type": "Ready", "status": "False", "reason": "Running",
                           "lastTransitionTime": "2026-01-01T00:00:00Z", "extra": 1}]}
    st = parse_status(raw)
    assert st.phase == "Training" and st.merge.attempt == 1
    assert st.conditions[0].reason == "Running"


def test_login_reads_the_token_file_each_time_and_expires(tmp_path: Path):
    from merit_operator.kubeapi import ApiConfig

    token = tmp_path / "token"
    token.write_text("first\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k",
                                                                      "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}]}))
    config = ApiConfig.from_kubeconfig(kubeconfig)
    info = connection_info(config, now=NOW)
    assert info.token == "first" and info.expiration is not None and info.expiration > NOW
    token.write_text("rotated\n")
    assert connection_info(config, now=NOW).token == "rotated"
    fixed = connection_info(ApiConfig(server="https://x", token="t"), now=NOW)
    assert fixed.token == "t" and fixed.expiration is None


def test_leader_election_settings():
    s = Settings.from_env({"MERITRUN_LEADER_ELECTION": "true"})
    assert s.leader_election and not Settings().leader_election
    with pytest.raises(SpecError, match="MERITRUN_LEADER_ELECTION"):
        Settings.from_env({"MERITRUN_LEADER_ELECTION": "maybe"})


def test_delete_waits_for_the_round_in_flight(tmp_path: Path):
    from merit_operator.context import OperatorContext

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}]}))
    ctx = OperatorContext(Settings(kubeconfig=str(kubeconfig), metrics_port=0))
    order: list[str] = []

    class Slow:
        def round(self, namespace: str, name: str):
            order.append("round-start")
            import time
            time.sleep(0.3)
            order.append("round-end")
            from merit_operator.reconcile import RoundOutcome
            return RoundOutcome()

        def cleanup(self, body: dict) -> int:
            order.append("cleanup")
            return 0

    ctx.reconciler = Slow()  # type: ignore[assignment]

    async def both() -> None:
        rnd = asyncio.ensure_future(ctx.reconcile("daemon", "ml", "demo"))
        await asyncio.sleep(0.05)
        await ctx.cleanup("ml", "demo", {})
        await rnd

    try:
        asyncio.run(both())
    finally:
        ctx.close()
    assert order == ["round-start", "round-end", "cleanup"]


def test_minio_grant_keys_and_expirations_fit_minio():
    from datetime import timedelta

    from meritrun.minio_issuer import minio_expiration, service_account_key

    key = service_account_key("meritrun-run-site-p0-a1")
    assert len(key) == 20 and key.isalnum() and key == service_account_key(
        "meritrun-run-site-p0-a1") != service_account_key("meritrun-run-site-p0-a2")
    # MinIO accepts 15 minutes to 365 days: shorter and longer grants are brought within
    assert minio_expiration(NOW + timedelta(seconds=5), now=NOW) == "2026-01-01T00:15:30Z"
    assert minio_expiration(NOW + timedelta(days=2), now=NOW) == "2026-01-03T00:00:00Z"
    assert minio_expiration(NOW + timedelta(days=900), now=NOW) == "2026-12-31T23:59:30Z"
