"""How a train Job runs on several GPUs and several nodes: the torchrun line and the gang.

One pod with N GPUs (N from `template.resources.limits["nvidia.com/gpu"]`) runs
`torchrun --standalone --nproc_per_node N`. `training.nodes: M > 1` makes the Job an Indexed
Job of M pods (completions = parallelism = M) behind a headless Service of the same name: pod 0
(`<job>-0.<job>`) is the rendezvous host and a pod's node rank is its completion index. The
gang lives or dies together: any pod failing fails the Job (podFailurePolicy FailJob), so the
pipeline still sees one child per attempt, and a Kueue queue label on the Job admits all M pods
at once. Every multi-process pod gets a memory-backed /dev/shm (the 64 MB default starves the
collectives). Profile, verify and merge Jobs stay single-pod, single-process. Pure functions.

The rendezvous port (pod 0's torchrun store) is the operator's setting `rendezvous_port`
(MERITRUN_RENDEZVOUS_PORT, default 29500, torchrun's own): a cluster whose network policy or
sidecars claim 29500 picks another, and so do tests, whose pods all share one loopback.
"""

from __future__ import annotations

from typing import Any

from meritrun.api import MeritRunSpec
from meritrun.jobs import CreateJob
from meritrun.stages import STAGE_MODULES

GPU_RESOURCE = "nvidia.com/gpu"
GPUS_ENV = "MERITRUN_GPUS"  # merit_trainer.dist refuses GPUs on an image without CUDA
NODE_RANK_ENV = "NODE_RANK"
RENDEZVOUS_PORT = 29500
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def gpus_per_pod(spec: MeritRunSpec) -> int:
    """GPUs the template asks for per pod (limits, else requests), 0 if none."""
    resources = spec.template.resources or {}
    for kind in ("limits", "requests"):
        amount = (resources.get(kind) or {}).get(GPU_RESOURCE)
        if amount is not None:
            return int(amount)
    return 0


def nodes(job: CreateJob, spec: MeritRunSpec) -> int:
    return spec.training.nodes if job.stage == "train" else 1


def processes_per_pod(job: CreateJob, spec: MeritRunSpec) -> int:
    return max(1, gpus_per_pod(spec)) if job.stage == "train" else 1


def is_gang(job: CreateJob, spec: MeritRunSpec) -> bool:
    return nodes(job, spec) > 1


def is_multiprocess(job: CreateJob, spec: MeritRunSpec) -> bool:
    return nodes(job, spec) * processes_per_pod(job, spec) > 1


def launch_command(job: CreateJob, spec: MeritRunSpec, *, stage_args: list[str],
                   python: str, port: int = RENDEZVOUS_PORT) -> list[str] | None:
    """The torchrun line for a multi-process train Job; None keeps the plain command."""
    if not is_multiprocess(job, spec):
        return None
    torchrun = [python, "-m", "merit_trainer.launch",  # torchrun keeping the stage's exit
                "--nproc_per_node", str(processes_per_pod(job, spec))]
    if is_gang(job, spec):
        torchrun += [f"--nnodes={nodes(job, spec)}", f"--node_rank=$({NODE_RANK_ENV})",
                     f"--master_addr={job.name}-0.{job.name}",
                     f"--master_port={port}"]
    else:
        torchrun.append("--standalone")
    return [*torchrun, "-m", STAGE_MODULES[job.stage], *stage_args]


def gang_env(job: CreateJob, spec: MeritRunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if job.stage == "train" and gpus_per_pod(spec):
        env.append({"name": GPUS_ENV, "value": str(gpus_per_pod(spec))})
    if is_gang(job, spec):
        env.append({"name": NODE_RANK_ENV,
                    "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}})
    return env


SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def shape_pod(pod: dict[str, Any], job: CreateJob, spec: MeritRunSpec) -> None:
    """Add /dev/shm to a multi-process pod and the gang's DNS subdomain (in place)."""
    if not is_multiprocess(job, spec):
        return
    pod["volumes"].append(dict(SHM_VOLUME))
    pod["containers"][0]["volumeMounts"].append(dict(SHM_MOUNT))
    if is_gang(job, spec):
        pod["subdomain"] = job.name  # <job>-<index>.<job> resolves through the headless Service


def gang_job_fields(job: CreateJob, spec: MeritRunSpec) -> dict[str, Any]:
    """Job spec fields of an M-node gang: Indexed, M at once, any failure fails the attempt."""
    if not is_gang(job, spec):
        return {}
    m = nodes(job, spec)
    return {
        "completions": m, "parallelism": m, "completionMode": "Indexed",
        "podFailurePolicy": {"rules": [
            # The cluster taking a pod away replaces it (the others then fail the gang);
            # any pod exiting non-zero ends the attempt at once.
            {"action": "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}},
        ]},
    }


def build_rendezvous_service(job: CreateJob, spec: MeritRunSpec, metadata: dict[str, Any], *,
                             port: int = RENDEZVOUS_PORT) -> dict[str, Any] | None:
    """The headless Service that gives a gang's pods their DNS names; None for one pod."""
    if not is_gang(job, spec):
        return None
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {JOB_NAME_LABEL: job.name},
                 "ports": [{"name": "rendezvous", "port": port}]},
    }
