"""Pure builders of the child objects the operator creates, and readers of what they report.

Every function here takes plain data and returns a dict (or reads one), so a manifest is
tested without a cluster. Label and annotation keys live here, under our API group, and
nowhere else. Credentials never appear in a manifest: a stage gets its S3 keys through
`secretKeyRef` entries naming the Secret of `spec.storage.secretRef`, resolved by the kubelet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meritrun import API_GROUP, API_VERSION
from meritrun.api import KIND, JobTemplate, MeritRunSpec
from meritrun.jobs import CreateJob
from meritrun.pipeline import JobObservation
from meritrun.stages import PARAMS_ENV, STAGES, stage_command

from . import gang

LABEL_RUN = f"{API_GROUP}/run"
LABEL_RUN_UID = f"{API_GROUP}/run-uid"
LABEL_STAGE = f"{API_GROUP}/stage"
LABEL_PARTITION = f"{API_GROUP}/partition"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "meritrun-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
FINALIZER = f"{API_GROUP}/finalizer"
ANNOTATION_PREFIX = API_GROUP

PARAMS_DIR = "/etc/meritrun"
PARAMS_KEY = "params.json"
# A Job's params up to this size share its stage attempt's ConfigMap: a stage attempt has at
# most MAX_PARTITIONS Jobs (64), so a shared ConfigMap stays under 768 KiB (the API's limit
# is 1 MiB). A train Job's params are about 1 KiB.
PARAMS_SHARED_BYTES = 12 * 1024
WORK_DIR = "/work"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CONTAINER_NAME = "stage"
# An evicted or drained pod is replaced without counting against backoffLimit; the new pod
# starts only once the old one is terminal (Failed), so two never write the same attempt.
DISRUPTION_TOLERANT: dict[str, Any] = {
    "podFailurePolicy": {"rules": [
        {"action": "Ignore",
         "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
    "podReplacementPolicy": "Failed",
}
# Merge and search stream tensors on CPUs; a GPU request there would idle an accelerator.
CPU_ONLY_STAGES = frozenset(n for n, d in STAGES.items() if not d.gpu)  # the merger image


@dataclass(frozen=True)
class RunRef:
    """The identity of the MeritRun that owns a child."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Images:
    """Default images (from the chart's values) for runs whose template names none, and how
    a stage starts in them: the interpreter, and the port a multi-node gang meets on."""

    trainer: str
    merger: str
    python: str = "python"
    rendezvous_port: int = gang.RENDEZVOUS_PORT


def run_selector(run: RunRef) -> str:
    return f"{LABEL_RUN}={run.name}"


def owner_reference(run: RunRef) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": run.name,
            "uid": run.uid, "controller": True, "blockOwnerDeletion": True}


def child_labels(job: CreateJob, *, run: RunRef) -> dict[str, str]:
    labels = {LABEL_RUN: run.name, LABEL_RUN_UID: run.uid, LABEL_STAGE: job.stage,
              LABEL_ATTEMPT: str(job.attempt), LABEL_MANAGED_BY: MANAGED_BY}
    if job.partition is not None:
        labels[LABEL_PARTITION] = job.partition
    return labels


def _metadata(name: str, job: CreateJob, *, run: RunRef, owned: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": run.namespace,
                            "labels": child_labels(job, run=run)}
    if owned:  # an owner on another cluster would make its garbage collector delete the child
        meta["ownerReferences"] = [owner_reference(run)]
    return meta


def params_key(job_name: str) -> str:
    """A Job's key in its params ConfigMap (Job names are DNS labels: valid keys)."""
    return f"{job_name}.json"


def params_json(job: CreateJob) -> str:
    return job.params.model_dump_json(indent=2)


def own_params_configmap_name(job_name: str) -> str:
    """The ConfigMap of a Job whose params are too large to share one."""
    return f"{job_name}-params"


def params_configmap_name(job: CreateJob, *, run: RunRef) -> str:
    """The ConfigMap holding a Job's params: one per stage attempt, shared by its Jobs (the K
    partitions of a round: one write, not K), each under its own key; a Job whose params
    exceed PARAMS_SHARED_BYTES has one of its own. Any choice is safe: a Job is created only
    after its key is in the ConfigMap it names."""
    if len(params_json(job).encode()) > PARAMS_SHARED_BYTES:
        return own_params_configmap_name(job.name)
    return f"{run.name}-{job.stage}-a{job.attempt}-params"


def build_params_configmaps(jobs: Sequence[CreateJob], *, run: RunRef,
                            owned: bool = True) -> list[dict[str, Any]]:
    """The ConfigMaps holding these Jobs' params (one per name), each Job's under
    `params_key`; its pod mounts that key alone at PARAMS_DIR/PARAMS_KEY."""
    grouped: dict[str, list[CreateJob]] = {}
    for job in jobs:
        grouped.setdefault(params_configmap_name(job, run=run), []).append(job)
    out = []
    for name, members in grouped.items():
        meta = _metadata(name, members[0], run=run, owned=owned)
        if name != own_params_configmap_name(members[0].name):
            meta["labels"].pop(LABEL_PARTITION, None)  # shared: no one partition's
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                    "data": {params_key(job.name): params_json(job) for job in members}})
    return out


def stage_image(stage: str, template: JobTemplate, images: Images) -> str:
    if stage in CPU_ONLY_STAGES:
        return template.merge_image or images.merger
    return template.image or images.trainer


def stage_resources(stage: str, template: JobTemplate) -> dict[str, Any] | None:
    if not template.resources:
        return None
    if stage not in CPU_ONLY_STAGES:
        return template.resources
    return {kind: {k: v for k, v in amounts.items() if "gpu" not in k.lower()}
            for kind, amounts in template.resources.items() if isinstance(amounts, dict)}


def _container_env(job: CreateJob, spec: MeritRunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": PARAMS_ENV, "value": f"{PARAMS_DIR}/{PARAMS_KEY}"},
                                 *gang.gang_env(job, spec)]
    secret = spec.storage.secret_ref if spec.storage else None
    if secret is not None:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
                for key in CREDENTIAL_KEYS]
    return env + list(spec.template.env or [])


def _work_volume(template: JobTemplate) -> dict[str, Any]:
    """The work directory: the template's PVC (checkpoints outlive the attempt) or an
    emptyDir (they die with the pod)."""
    if template.work_volume:
        return {"name": "work", "persistentVolumeClaim": {"claimName": template.work_volume}}
    return {"name": "work", "emptyDir": {}}


def _work_mount(job: CreateJob, template: JobTemplate) -> dict[str, Any]:
    mount = {"name": "work", "mountPath": WORK_DIR}
    if template.work_volume:  # one claim serves every stage: each its own directory
        mount["subPath"] = f"{job.params.run}/{job.partition or job.stage}"
    return mount


def _pod_spec(job: CreateJob, spec: MeritRunSpec, images: Images, run: RunRef) -> dict[str, Any]:
    template = spec.template
    command = [*stage_command(job.stage, f"{PARAMS_DIR}/{PARAMS_KEY}", python=images.python),
               "--workdir", WORK_DIR]
    command = gang.launch_command(job, spec, stage_args=command[3:], python=images.python,
                                  port=images.rendezvous_port) or command
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": stage_image(job.stage, template, images),
        "command": command,
        "env": _container_env(job, spec),
        "volumeMounts": [{"name": "params", "mountPath": PARAMS_DIR, "readOnly": True},
                         _work_mount(job, template)],
        # The stage's last words (its MERITRUN_ERROR line) become the pod's termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = stage_resources(job.stage, template)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # stages talk to storage, never to the API
        "containers": [container],
        "volumes": [
            {"name": "params", "configMap": {  # its own params only, whoever shares the map
                "name": params_configmap_name(job, run=run),
                "items": [{"key": params_key(job.name), "path": PARAMS_KEY}]}},
            _work_volume(template),
        ],
    }
    gang.shape_pod(pod, job, spec)
    if template.service_account_name:
        pod["serviceAccountName"] = template.service_account_name
    if template.node_selector:
        pod["nodeSelector"] = template.node_selector
    if template.tolerations:
        pod["tolerations"] = template.tolerations
    return pod


def build_stage_job(job: CreateJob, *, run: RunRef, spec: MeritRunSpec, images: Images,
                    owned: bool = True) -> dict[str, Any]:
    """A batch/v1 Job running one attempt of one stage.

    backoffLimit is 0: retries are the pipeline's, each under a new attempt-fenced name.
    A pod the cluster took away (eviction, node drain, preemption: condition DisruptionTarget)
    is not a failure of the stage: the Job replaces it without spending the attempt.
    """
    meta = _metadata(job.name, job, run=run, owned=owned)
    queue = spec.template.queue_name
    if queue:
        meta["labels"][KUEUE_QUEUE_LABEL] = queue
    job_spec: dict[str, Any] = {
        "backoffLimit": 0, "completions": 1, "parallelism": 1,
        **DISRUPTION_TOLERANT,
        **gang.gang_job_fields(job, spec),
        "template": {"metadata": {"labels": dict(meta["labels"])},
                     "spec": _pod_spec(job, spec, images, run)},
    }
    if spec.template.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.template.ttl_seconds_after_finished
    deadline = job.deadline_seconds or spec.active_deadline_seconds
    if deadline is not None:
        # No stage may outlive the whole run: what is left of it when the Job is created.
        job_spec["activeDeadlineSeconds"] = deadline
    if queue:
        job_spec["suspend"] = True  # Kueue unsuspends the Job once the queue admits it
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_rendezvous_service(job: CreateJob, *, run: RunRef, spec: MeritRunSpec,
                             images: Images, owned: bool = True) -> dict[str, Any] | None:
    """The headless Service a multi-node train Job's pods find each other through (same
    name as the Job); None for a single-pod Job."""
    meta = _metadata(job.name, job, run=run, owned=owned)
    return gang.build_rendezvous_service(job, spec, meta, port=images.rendezvous_port)


def job_observation(obj: dict[str, Any]) -> JobObservation:
    """What the Job controller reports, in the pipeline's terms."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return JobObservation("Succeeded")
        if cond.get("type") == "Failed":
            reason, message = cond.get("reason") or "Failed", cond.get("message") or ""
            return JobObservation("Failed", f"{reason}: {message}".rstrip(": ")[:500])
    if (obj.get("spec") or {}).get("suspend"):
        queue = ((obj.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        why = (f"not admitted by queue {queue!r} (is Kueue installed and the LocalQueue "
               "there?)" if queue else "the Job is suspended")
        return JobObservation("Active", waiting=f"Suspended: {why}")
    return JobObservation("Active")


# Waiting reasons that leave a pod stuck until someone acts; ContainerCreating and
# PodInitializing are normal steps and are not reported.
STUCK_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                           "CreateContainerConfigError", "CreateContainerError",
                           "CrashLoopBackOff"})


def pod_waiting_reason(pod: dict[str, Any]) -> str | None:
    """Why a pod of an Active Job makes no progress ("Reason: message"), or None."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []),
               *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")[:300]
    for cond in status.get("conditions") or []:
        if (cond.get("type") == "PodScheduled" and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"):
            return f"Unschedulable: {cond.get('message') or ''}".rstrip(": ")[:300]
    return None
