"""The Job watch: wake a run's daemon when one of its Jobs changes, with a server-side filter.

kopf's `labels=` filter on a watch is applied by kopf, after the API server has sent every
Job of the cluster (or namespace): on a big cluster the operator would decode every Job
event. This watch asks the server for our Jobs only (`labelSelector=<run label>`), per
served namespace (a namespaced install needs no cluster-wide Job rights) or cluster-wide.

list, then watch from the list's resourceVersion; a 410 Gone (history compacted) or a
broken stream relists, after a short pause. An event wakes the run named by the Job's run
label only when what a round reads from the Job changed: a Job seen for the first time (or
a new Job under an old name), gone, or with another state (Active, Succeeded, Failed) or
held state (suspended for a queue). The Job controller rewrites a Job's status several times
on the way (start time, active, ready pods, ...), and each would otherwise cost its run a
round that finds nothing new. The daemon's round then reads the Jobs itself (level-based),
so a missed event costs at most one resync period, never correctness. Runs in its own
thread (blocking HTTP); wakes are handed to the event loop thread-safely.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from meritrun.errors import MeritRunError

from .kubeapi import ApiError, KubeApi
from .manifests import LABEL_RUN, job_observation

log = logging.getLogger(__name__)
WATCH_TIMEOUT_SECONDS = 300
RELIST_PAUSE_SECONDS = 1.0
Wake = Callable[[str, str], None]


def job_watch_paths(namespaces: tuple[str, ...]) -> list[str]:
    """One watch per served namespace, or one cluster-wide."""
    if not namespaces:
        return ["/apis/batch/v1/jobs"]
    return [f"/apis/batch/v1/namespaces/{ns}/jobs" for ns in namespaces]


def job_selector() -> str:
    """The server-side filter: Jobs that carry a run label (only ours do)."""
    return LABEL_RUN


def job_signature(job: dict[str, Any]) -> tuple[str, ...]:
    """What a round reads from a Job: which Job (uid), its state and why it is held."""
    seen = job_observation(job)
    return ((job.get("metadata") or {}).get("uid") or "", seen.state, seen.waiting or "")


def run_of(job: dict[str, Any]) -> tuple[str, str] | None:
    meta = job.get("metadata") or {}
    run = (meta.get("labels") or {}).get(LABEL_RUN)
    return (meta.get("namespace") or "", run) if run and meta.get("namespace") else None


class JobWatch:
    """Follow one path's Jobs until stopped; `wake(namespace, run)` on every change."""

    def __init__(self, api: KubeApi, path: str, wake: Wake, *,
                 timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.api, self.path, self.wake, self.timeout_seconds = api, path, wake, timeout_seconds
        self.events = 0  # Job events received (the test checks the filter with it)
        self.wakes = 0  # wake-ups sent (events that changed what a round reads)
        self._seen: dict[tuple[str, str], tuple[str, ...]] = {}  # (namespace, Job) -> signature

    def _list(self) -> str:
        listed = self.api.request("GET", self.path, query={"labelSelector": job_selector()})
        self._seen.clear()  # after a gap in the stream, every Job counts as news
        for job in listed.get("items") or []:
            self._notify(job, deleted=False)
        return (listed.get("metadata") or {}).get("resourceVersion") or ""

    def _notify(self, job: dict[str, Any], *, deleted: bool) -> None:
        where = run_of(job)
        if where is None:
            return
        key = (where[0], (job.get("metadata") or {}).get("name") or "")
        if deleted:
            self._seen.pop(key, None)
        else:
            signature = job_signature(job)
            if self._seen.get(key) == signature:
                return  # a status detail the round does not read
            self._seen[key] = signature
        self.wakes += 1
        self.wake(*where)

    def _follow(self, version: str, stop: threading.Event) -> str | None:
        """Watch from version; the last version seen, or None when the server says 410."""
        query = {"labelSelector": job_selector(), "resourceVersion": version,
                 "allowWatchBookmarks": "true"}
        for event in self.api.watch(self.path, query=query,
                                    timeout_seconds=self.timeout_seconds):
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise ApiError(int(obj.get("code") or 500), obj.get("reason") or "",
                               obj.get("message") or "")
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if event.get("type") != "BOOKMARK":
                self.events += 1
                self._notify(obj, deleted=event.get("type") == "DELETED")
            if stop.is_set():
                break
        return version

    def run(self, stop: threading.Event) -> None:
        version: str | None = None
        while not stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._follow(version, stop)
                continue
            except MeritRunError as e:  # ApiError, TransientError: relist after a pause
                log.warning("job watch %s: %s; relisting", self.path, str(e)[:300])
                version = None
            stop.wait(RELIST_PAUSE_SECONDS)


def start_job_watches(api: KubeApi, namespaces: tuple[str, ...], wake: Wake,
                      stop: threading.Event) -> list[JobWatch]:
    """One daemon thread per watched path; they end when stop is set (or with the process)."""
    watches = [JobWatch(api, path, wake) for path in job_watch_paths(namespaces)]
    for watch in watches:
        threading.Thread(target=watch.run, args=(stop,), name=f"job-watch {watch.path}",
                         daemon=True).start()
    return watches
