"""The Kubernetes backend: carries out the pipeline's actions and observes child Jobs.

Every action is idempotent, because a round can be repeated after a crash or a stale read:
create checks nothing up front but accepts 409 AlreadyExists and adopts what it finds (a
child of an earlier run with the same name is deleted instead, and the round retried); delete
accepts 404. Children are found by label and checked by owner uid. Blocking calls: the
handlers run these methods in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from meritrun import API_GROUP, API_VERSION
from meritrun.api import PLURAL, MeritRunSpec
from meritrun.errors import SpecError, TransientError
from meritrun.jobs import CreateJob
from meritrun.pipeline import JobObservation, exit_verdict

from .kubeapi import ApiError, KubeApi
from .manifests import (
    LABEL_RUN,
    LABEL_RUN_UID,
    Images,
    RunRef,
    build_params_configmaps,
    build_rendezvous_service,
    build_stage_job,
    job_observation,
    own_params_configmap_name,
    pod_waiting_reason,
    run_selector,
)
from .pods import failed_pod, started_jobs, termination_reason
from .remote import RemoteClusters

log = logging.getLogger(__name__)


class JobSource(Protocol):
    """This cluster's Jobs and pods of a run from the watches (None: not synced, list)."""

    def jobs(self, namespace: str, run: str) -> list[dict[str, Any]] | None: ...
    def run_pods(self, namespace: str, run: str) -> list[dict[str, Any]] | None: ...
    def remember(self, obj: dict[str, Any]) -> None: ...


def run_path(namespace: str, name: str | None = None, *, subresource: str | None = None) -> str:
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    if name:
        path += f"/{name}"
    return path + (f"/{subresource}" if subresource else "")


def jobs_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def is_ours(obj: dict[str, Any], run: RunRef) -> bool:
    """A child of this incarnation of the run (not of a deleted run with the same name)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_RUN) == run.name and labels.get(LABEL_RUN_UID) in (None, run.uid)


class KubeBackend:
    """This cluster's API (and remote clusters' for kubeconfig sites)."""

    def __init__(self, api: KubeApi, *, images: Images,
                 remotes: RemoteClusters | None = None, jobs: JobSource | None = None) -> None:
        self.api = api
        self.images = images
        self.remotes = remotes or RemoteClusters(api)
        self.jobs = jobs  # this cluster's Jobs from the watch (None: a LIST per round)

    # --- the MeritRun itself --------------------------------------------------------------

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get(run_path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str,
                     patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource: the run as written, or None when it is gone."""
        try:
            return self.api.merge_patch(run_path(namespace, name, subresource="status"),
                                        {"status": patch})
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    # --- children ---------------------------------------------------------------------------

    def unstarted(self, run: RunRef, jobs: Mapping[str, JobObservation]) -> set[str]:
        """This cluster's Active Jobs of the run none of whose pods has started (the pod
        store's view): their stage cannot have written progress yet. Empty when the store
        cannot tell (not synced, no store)."""
        pods = self.jobs.run_pods(run.namespace, run.name) if self.jobs else None
        if pods is None:
            return set()
        started = started_jobs(pods, run_uid=run.uid)
        return {name for name, seen in jobs.items()
                if seen.cluster is None and seen.state == "Active" and name not in started}

    def _where(self, run: RunRef, spec: MeritRunSpec | None,
               cluster: str | None) -> tuple[KubeApi, RunRef]:
        if cluster is None:
            return self.api, run
        if spec is None:
            raise SpecError(f"cannot reach cluster {cluster!r} without a valid spec",
                            path="spec.sites")
        api, namespace = self.remotes.client_for(run.namespace, spec, cluster)
        return api, replace(run, namespace=namespace)

    def _clusters(self, spec: MeritRunSpec | None) -> list[str | None]:
        sites = spec.sites or [] if spec is not None else []
        return [None] + [s.name for s in sites if s.mode == "kubeconfig"]

    def observe_jobs(self, run: RunRef, spec: MeritRunSpec | None) -> dict[str, JobObservation]:
        """The run's Jobs on this cluster and (valid spec) on its kubeconfig sites' clusters,
        each with the cluster it was seen on, so a DeleteJob goes where the Job runs."""
        seen: dict[str, JobObservation] = {}
        for cluster in self._clusters(spec):
            api, where = self._where(run, spec, cluster)
            here: dict[str, JobObservation] = {}
            for obj in self._listed_jobs(api, where, cached=cluster is None):
                if not is_ours(obj, run):
                    continue  # a leftover of an earlier run with this name: not evidence
                name = obj["metadata"]["name"]
                observation = job_observation(obj)
                if observation.state == "Failed":
                    observation = self._with_reason(api, where.namespace, name, observation)
                here[name] = replace(observation, cluster=cluster)
            if any(o.state == "Active" and not o.waiting for o in here.values()):
                here = self._with_waiting(api, where, here, cached=cluster is None)
            seen.update(here)
        return seen

    def _listed_jobs(self, api: KubeApi, run: RunRef, *, cached: bool) -> list[dict[str, Any]]:
        """The run's Jobs: from the watch's store on this cluster once it is synced, else
        listed (a remote cluster, or before the first list). Pods likewise (`_with_waiting`);
        a failed Job's pods are listed fresh (`_with_reason`): its pod's termination message
        must be there, and the pod store may lag the Job's."""
        found = self.jobs.jobs(run.namespace, run.name) if cached and self.jobs else None
        if found is not None:
            return found
        return api.list(jobs_path(run.namespace), labels=run_selector(run))

    def _with_waiting(self, api: KubeApi, run: RunRef, jobs: dict[str, JobObservation], *,
                      cached: bool = False) -> dict[str, JobObservation]:
        """Active Jobs whose pod is stuck (image pull, config, scheduling) say why."""
        pods = self.jobs.run_pods(run.namespace, run.name) if cached and self.jobs else None
        try:
            if pods is None:
                pods = api.list(core_path(run.namespace, "pods"), labels=run_selector(run))
        except ApiError as e:  # a nicety, like the failure reason: never stops the round
            log.debug("cannot list pods of run %s: %s", run.name, e)
            return jobs
        out = dict(jobs)
        for pod in pods:
            job = ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")
            seen = out.get(job or "")
            if seen is None or seen.state != "Active" or seen.waiting:
                continue
            reason = pod_waiting_reason(pod)
            if reason:
                out[job] = replace(seen, waiting=reason)  # type: ignore[index]
        return out

    def _with_reason(self, api: KubeApi, namespace: str, job: str,
                     observation: JobObservation) -> JobObservation:
        try:
            pods = api.list(core_path(namespace, "pods"), labels=f"job-name={job}")
        except ApiError as e:  # the message is a nicety; lacking it must not stop the round
            log.debug("cannot list pods of job %s: %s", job, e)
            return observation
        pods = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {})
                .get("job-name") == job]
        reason, code = termination_reason(pods, culprit=failed_pod(observation.message))
        return replace(observation, message=reason or observation.message, **exit_verdict(code))

    def create_params(self, actions: list[CreateJob], *, run: RunRef,
                      spec: MeritRunSpec) -> None:
        """The params ConfigMap(s) of these Jobs (one stage attempt on one cluster), before
        any of them is created: one write for a round's K partitions. An existing one (an
        earlier round's, or one it lost a Job of) gets these Jobs' keys added."""
        api, where = self._where(run, spec, actions[0].cluster)
        path = core_path(where.namespace, "configmaps")
        for configmap in build_params_configmaps(actions, run=where,
                                                 owned=actions[0].cluster is None):
            if not self._create(api, path, configmap, run):
                # A merge patch adds keys and keeps the others' (params of the same Job may
                # differ only if the spec changed).
                api.merge_patch(f"{path}/{configmap['metadata']['name']}",
                                {"data": configmap["data"]})

    def create_job(self, action: CreateJob, *, run: RunRef, spec: MeritRunSpec) -> bool:
        """Create the Job (its params are in place: `create_params`); True if it is new."""
        api, where = self._where(run, spec, action.cluster)
        owned = action.cluster is None
        job = build_stage_job(action, run=where, spec=spec, images=self.images, owned=owned)
        service = build_rendezvous_service(action, run=where, spec=spec, images=self.images,
                                           owned=owned)
        if service is not None:  # a multi-node gang: its pods' DNS names, before the pods
            self._create(api, core_path(where.namespace, "services"), service, run)
        new, written = self._created(api, jobs_path(where.namespace), job, run)
        if action.cluster is None and self.jobs is not None:
            self.jobs.remember(written)  # the next round sees it, whatever its watch's lag
        return new

    def _create(self, api: KubeApi, path: str, body: dict[str, Any], run: RunRef) -> bool:
        return self._created(api, path, body, run)[0]

    def _created(self, api: KubeApi, path: str, body: dict[str, Any],
                 run: RunRef) -> tuple[bool, dict[str, Any]]:
        """Create, or adopt what an earlier round of this run created: (new?, the object)."""
        name = body["metadata"]["name"]
        try:
            return True, api.create(path, body)
        except ApiError as e:
            if e.status == 422:
                raise SpecError(f"the API server rejected {body['kind']} {name}: {e.message}",
                                path="spec.template") from e
            if e.status != 409:
                raise
        existing = api.get(f"{path}/{name}")
        if is_ours(existing, run):
            return False, existing  # adopted: an earlier round (or operator) created it
        log.warning("%s %s belongs to an earlier run named %s; deleting it", body["kind"],
                    name, run.name)
        self._delete(api, f"{path}/{name}")
        raise TransientError(f"{body['kind']} {name} was left by an earlier run; retrying")

    @staticmethod
    def _delete(api: KubeApi, path: str) -> bool:
        try:
            api.delete(path, propagation="Background")
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def delete_job(self, name: str, *, run: RunRef, spec: MeritRunSpec | None,
                   cluster: str | None = None) -> None:
        api, where = self._where(run, spec, cluster)
        self._delete(api, jobs_path(where.namespace, name))
        # A Job's own params ConfigMap, if it had one; a shared one stays until the run goes
        # (its other Jobs' pods may still start).
        self._delete(api, core_path(where.namespace, "configmaps", own_params_configmap_name(name)))
        if spec is not None and spec.training.nodes > 1:  # the gang's Service: the Job's name
            self._delete(api, core_path(where.namespace, "services", name))

    def delete_children(self, run: RunRef, spec: MeritRunSpec | None) -> int:
        """Every Job, ConfigMap (and gang Service) of the run, on every cluster it used;
        returns the count."""
        deleted = 0
        clusters = self._clusters(spec) if spec is not None else [None]
        for cluster in clusters:
            api, where = self._where(run, spec, cluster) if spec else (self.api, run)
            paths = [jobs_path(where.namespace), core_path(where.namespace, "configmaps")]
            if spec is not None and spec.training.nodes > 1:
                paths.append(core_path(where.namespace, "services"))
            for path in paths:
                for obj in api.list(path, labels=run_selector(run)):
                    if is_ours(obj, run):
                        deleted += self._delete(api, f"{path}/{obj['metadata']['name']}")
        return deleted
