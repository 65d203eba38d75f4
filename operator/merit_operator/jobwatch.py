"""The Job watch: a wake-up for a run when one of its Jobs changes, with a server-side filter.

kopf's `labels=` filter on a watch is applied by kopf, after the API server has sent every
Job of the cluster (or namespace): on a big cluster the operator would decode every Job
event. This watch is a `WatchStore` (our Jobs only, `labelSelector=<run label>`, per served
namespace or cluster-wide), so rounds also read their Jobs from it instead of a LIST.

An event wakes the run named by the Job's run label only when what a round reads from the
Job changed: a Job seen for the first time (or a new Job under an old name), gone, or with
another state (Active, Succeeded, Failed) or held state (suspended for a queue). The Job
controller rewrites a Job's status several times on the way (start time, active, ready
pods, ...), and each would otherwise cost its run a round that finds nothing new. A relist
counts every Job as news. The daemon's round then reads the Jobs itself (level-based), so a
missed event costs at most one resync period, never correctness. Wakes are handed to the
event loop thread-safely; the store has the Job before its wake-up goes out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .kubeapi import KubeApi
from .manifests import job_observation
from .watchstore import (
    WATCH_TIMEOUT_SECONDS,
    Stores,
    WatchStore,
    Where,
    name_of,
    run_of,
    watch_paths,
)

Wake = Callable[[str, str], None]


def job_watch_paths(namespaces: tuple[str, ...]) -> list[str]:
    """One watch per served namespace, or one cluster-wide."""
    return watch_paths("batch/v1", "jobs", namespaces)


def job_signature(job: dict[str, Any]) -> tuple[str, ...]:
    """What a round reads from a Job: which Job (uid), its state and why it is held."""
    seen = job_observation(job)
    return ((job.get("metadata") or {}).get("uid") or "", seen.state, seen.waiting or "")


class JobWatch(WatchStore):
    """Follow one path's Jobs until stopped; `wake(namespace, run)` on every change."""

    def __init__(self, api: KubeApi, path: str, wake: Wake, *,
                 timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        super().__init__(api, path, timeout_seconds=timeout_seconds)
        self.wake = wake
        self.wakes = 0  # wake-ups sent (events that changed what a round reads)
        self._seen: dict[tuple[str, str], tuple[str, ...]] = {}  # (namespace, Job) -> signature

    def relisted(self, objects: list[dict[str, Any]]) -> None:
        self._seen.clear()  # after a gap in the stream, every Job counts as news
        for job in objects:
            self.changed(job, run_of(job), deleted=False)  # type: ignore[arg-type]

    def changed(self, job: dict[str, Any], where: Where, *, deleted: bool) -> None:
        key = (where[0], name_of(job))
        if deleted:
            self._seen.pop(key, None)
        else:
            signature = job_signature(job)
            if self._seen.get(key) == signature:
                return  # a status detail the round does not read
            self._seen[key] = signature
        self.wakes += 1
        self.wake(*where)


class JobCache(Stores):
    """The Jobs (and pods) of every served namespace, from the watches."""

    def __init__(self, watches: list[JobWatch], namespaces: tuple[str, ...],
                 pods: Stores | None = None) -> None:
        super().__init__(list(watches), namespaces)
        self.watches, self.pods = watches, pods

    def jobs(self, namespace: str, run: str) -> list[dict[str, Any]] | None:
        return self.objects(namespace, run)

    def run_pods(self, namespace: str, run: str) -> list[dict[str, Any]] | None:
        return self.pods.objects(namespace, run) if self.pods is not None else None


def start_job_watches(api: KubeApi, namespaces: tuple[str, ...], wake: Wake,
                      stop: threading.Event) -> JobCache:
    """The Job watches (which wake runs) and the pod stores, each in a daemon thread until
    stop is set (or the process ends)."""
    watches = [JobWatch(api, path, wake) for path in job_watch_paths(namespaces)]
    pods = [WatchStore(api, path) for path in watch_paths("v1", "pods", namespaces)]
    for store in [*watches, *pods]:
        store.start(stop)
    return JobCache(watches, namespaces, Stores(pods, namespaces))
