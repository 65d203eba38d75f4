"""Kueue's real manager admits MeritRun Jobs within a GPU quota and holds the rest.

A ClusterQueue with one nvidia.com/gpu (the node stand-in advertises eight) and its LocalQueue
`gpu`; two MeritRuns with `template.queueName: gpu` whose profile Jobs ask for one GPU each.
Kueue must run them one at a time (each Job created suspended, unsuspended on admission);
while one waits, its run's status names the queue and an event says so. Only the profile
stage is run: this machine has no CUDA, and a train Job that asks for a GPU starts torchrun
on it and refuses to train on CPUs (by design), so the runs are deleted once both profiles
have succeeded.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import yaml
from support.kube import KubeCluster, OperatorProcess, wait_until
from support.kube_e2e import apply, node_options, render_example, stage_inputs
from support.kueue import KueueManager, gpu_queue

RUNS = ("first", "second")


@pytest.fixture(scope="module")
def kueue(control_plane, tmp_path_factory):
    manager = KueueManager(control_plane, tmp_path_factory.mktemp("kueue")).start()
    yield manager
    manager.stop()


class Sampler:
    """Every 0.3 s: which GPU Jobs run unsuspended at once, and what the status says."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.most_at_once = 0
        self.waiting: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(0.3):
            jobs = self.cluster.objects("batch/v1/jobs")
            running = [j for j in jobs if not j["spec"].get("suspend")
                       and not (j.get("status") or {}).get("completionTime")
                       and not _finished(j) and _gpus(j)]
            self.most_at_once = max(self.most_at_once, len(running))
            for run in RUNS:
                profile = self.cluster.run_status(run).get("profile") or {}
                if (profile.get("waiting") or "").startswith("Suspended"):
                    self.waiting.add(run)


def _finished(job: dict[str, Any]) -> bool:
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _gpus(job: dict[str, Any]) -> int:
    containers = job["spec"]["template"]["spec"]["containers"]
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
               for c in containers)


def profiled(cluster: KubeCluster) -> bool:
    states = [(cluster.run_status(r).get("profile") or {}).get("state") for r in RUNS]
    assert "Failed" not in states, states
    return states == ["Succeeded", "Succeeded"]


def test_jobs_are_admitted_within_the_gpu_quota(kueue, kube_cluster, seaweed, tiny_base,
                                                tiny_mixture):
    cluster = kube_cluster
    staged = stage_inputs(seaweed, tiny_base, tiny_mixture)
    bucket, creds = staged.bucket, staged.creds
    cluster.start_node(node_options())
    cluster.create_secret("meritrun-storage", creds)
    queues = yaml.safe_dump_all(gpu_queue(cluster.namespace, gpus=1))
    cluster.kubectl("apply", "-f", "-", stdin=queues)
    operator = OperatorProcess(cluster, env=creds).start()
    sampler = Sampler(cluster)
    sampler.thread.start()
    try:
        for run in RUNS:
            apply(cluster, render_example(bucket=bucket, endpoint=seaweed.endpoint, name=run,
                                          changes={"template.queueName": "gpu",
                                                   "template.resources": {
                                                       "requests": {"cpu": "1"},
                                                       "limits": {"nvidia.com/gpu": 1}}}))
        wait_until(lambda: profiled(cluster), timeout=300, what="both profiles")
    finally:
        sampler.stop.set()
        sampler.thread.join(5)
        cluster.kubectl("delete", "meritruns", "--all", "--timeout=90s", check=False)
        operator.stop()
        kueue_log = kueue.log()
        cluster.kubectl("delete", "-f", "-", check=False, stdin=queues)
        seaweed.remove_bucket(bucket)
    assert sampler.most_at_once == 1, kueue_log[-2000:]  # one GPU of quota: one at a time
    assert sampler.waiting, "no run was ever shown waiting for admission"
    held = [e for e in cluster.objects("v1/events")
            if e.get("reason") == "JobWaiting" and "not admitted by queue 'gpu'" in e["message"]]
    assert held, "no JobWaiting event"
    operator.assert_no_exceptions()
