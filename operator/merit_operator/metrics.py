"""Prometheus metrics of the operator: prefix `meritrun_`, base units, bounded labels.

Labels never carry run or partition names (unbounded); per-run detail lives in the status and
in events. Counters are derived from status transitions (old status -> new status), so a
repeated round or a restarted operator does not count the same success twice within one
process. The registry is our own, so tests get a fresh one and the exposition holds only
what we chose (plus the standard process/platform/gc collectors in the operator).
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import meritrun
from meritrun.api import MeritRunStatus
from meritrun.api.status import Phase
from meritrun.conditions import from_rfc3339

PHASES: tuple[str, ...] = get_args(Phase)
# Who asks for rounds: the daemon per run (a new run's first round, resyncs, wake-ups), a
# spec edit (`meritrun_changed`), the finalizer.
HANDLERS = ("update", "daemon", "delete")
# Where a round's time goes: reading the run, its Jobs, its storage and grants, and the rest
# (deciding, the actions carried out in the round, handing creations to the pool).
ROUND_PHASES = ("run", "jobs", "storage", "grants", "decide")
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MERGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)


class Metrics:
    """All operator metrics on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process_collectors: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.reconciles = Counter("meritrun_reconcile", "Reconcile rounds by handler.",
                                  ["handler"], registry=r)
        self.reconcile_errors = Counter(
            "meritrun_reconcile_errors", "Reconcile rounds that raised, by handler and kind.",
            ["handler", "kind"], registry=r)
        self.reconcile_duration = Histogram(
            "meritrun_reconcile_duration_seconds", "Duration of one reconcile round.",
            ["handler"], buckets=ROUND_BUCKETS, registry=r)
        self.reconcile_latency = Histogram(
            "meritrun_reconcile_latency_seconds", "From a handler asking for a round to its "
            "outcome: the round plus its waits for the run's lock, the previous round's "
            "commit and a worker thread.", ["handler"], buckets=ROUND_BUCKETS, registry=r)
        self.reconcile_phase = Histogram(
            "meritrun_reconcile_phase_seconds", "Time of one round spent per phase (run, "
            "jobs, storage and grants: reading them; decide: the rest).", ["phase"],
            buckets=ROUND_BUCKETS, registry=r)
        self.reconcile_cpu = Histogram(
            "meritrun_reconcile_cpu_seconds", "CPU time of one round's thread: its own "
            "compute; the rest of its wall time it waited (API, S3, the CPU, the GIL).",
            buckets=ROUND_BUCKETS, registry=r)
        self.reconcile_commit = Histogram(
            "meritrun_reconcile_commit_seconds", "A round's commit, after the round: its Job "
            "creations, then the status write.", buckets=ROUND_BUCKETS, registry=r)
        self.coalesced = Counter(
            "meritrun_reconcile_coalesced", "Requests for a round answered by a round that "
            "started after them (wake-ups coalesced), by handler.", ["handler"], registry=r)
        self.runs = Gauge("meritrun_runs", "MeritRuns by phase.", ["phase"], registry=r)
        self.jobs_created = Counter("meritrun_jobs_created", "Stage Jobs created, by stage.",
                                    ["stage"], registry=r)
        self.partition_jobs = Counter(
            "meritrun_partition_jobs", "Finished partition attempts, by result.", ["result"],
            registry=r)
        self.retries = Counter("meritrun_retries", "Stage attempts started after a failure.",
                               ["stage"], registry=r)
        self.bytes_uploaded = Counter(
            "meritrun_artifact_uploaded_bytes", "Bytes of partition artifacts uploaded.",
            registry=r)
        self.bytes_verified = Counter(
            "meritrun_artifact_verified_bytes", "Bytes of partition artifacts the merge "
            "verified and used.", registry=r)
        self.verification_failures = Counter(
            "meritrun_artifact_verification_failures", "Partition artifacts the merge refused.",
            registry=r)
        self.contributions = Counter(
            "meritrun_site_contributions", "Pull-site contributions verified on arrival, by "
            "result.", ["result"], registry=r)
        self.background_reads = Counter(
            "meritrun_storage_background_reads", "Results of running stages read off the "
            "round's path, by result (found, absent, error).", ["result"], registry=r)
        self.grants_issued = Counter(
            "meritrun_site_grants_issued", "Scoped storage grants issued to pull sites.",
            registry=r)
        self.merge_duration = Histogram(
            "meritrun_merge_duration_seconds", "From the first merge attempt to the merged "
            "model.", buckets=MERGE_BUCKETS, registry=r)
        self.build = Info("meritrun_build", "Operator build.", registry=r)
        self.build.info({"version": meritrun.__version__,
                         "python": platform.python_version()})
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.runs.labels(phase=phase).set(0)
        for handler in HANDLERS:  # series exist from the start: rate() needs a first sample
            self.reconciles.labels(handler=handler)
            self.reconcile_duration.labels(handler=handler)
            self.reconcile_latency.labels(handler=handler)
            self.coalesced.labels(handler=handler)

    @contextmanager
    def round(self, handler: str) -> Iterator[None]:
        """Count and time one reconcile round; an exception is counted by its kind."""
        start = time.perf_counter()
        try:
            yield
        except Exception as e:
            self.reconcile_errors.labels(handler=handler, kind=error_kind(e)).inc()
            raise
        finally:
            self.reconciles.labels(handler=handler).inc()
            self.reconcile_duration.labels(handler=handler).observe(time.perf_counter() - start)

    def round_phases(self, phases: Mapping[str, float], total: float, cpu: float) -> None:
        """One round's phases; `decide` is what the reads leave of the total."""
        self.reconcile_cpu.observe(cpu)
        for phase in ROUND_PHASES[:-1]:
            if phase in phases:
                self.reconcile_phase.labels(phase=phase).observe(phases[phase])
        self.reconcile_phase.labels(phase="decide").observe(max(total - sum(phases.values()),
                                                                0.0))

    def committed(self, seconds: float) -> None:
        self.reconcile_commit.observe(seconds)

    def handled(self, handler: str, seconds: float, *, coalesced: bool) -> None:
        """One handler's request for a round, answered (by its own round or a newer one)."""
        self.reconcile_latency.labels(handler=handler).observe(seconds)
        if coalesced:
            self.coalesced.labels(handler=handler).inc()

    def set_phase(self, uid: str, phase: str) -> None:
        with self._lock:
            self._phases[uid] = phase
            self._publish()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)
            self._publish()

    def _publish(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.runs.labels(phase=phase).set(count)

    def background_read(self, result: str) -> None:
        self.background_reads.labels(result=result).inc()

    def grant_issued(self) -> None:
        self.grants_issued.inc()

    def job_created(self, stage: str) -> None:
        self.jobs_created.labels(stage=stage).inc()

    def record_transition(self, old: MeritRunStatus | None, new: MeritRunStatus) -> None:
        """Count what changed between two statuses of one run."""
        old = old or MeritRunStatus()
        before = {p.name: p for p in old.partitions}
        for part in new.partitions:
            prev = before.get(part.name)
            prev_state = prev.state if prev else "Pending"
            if part.state == "Succeeded" and prev_state != "Succeeded":
                self.partition_jobs.labels(result="succeeded").inc()
                self.bytes_uploaded.inc((part.artifact and part.artifact.bytes) or 0)
            elif part.state in ("BackingOff", "Failed") and prev_state == "Running":
                self.partition_jobs.labels(result="failed").inc()
            if prev_state == "Verifying" and part.state != "Verifying":
                result = "accepted" if part.state == "Succeeded" else "refused"
                self.contributions.labels(result=result).inc()
            elif prev is not None and part.attempt > max(prev.attempt, 1):
                self.retries.labels(stage="train").inc()
            refused = (part.message or "").startswith("refused by merge")
            if refused and not ((prev and prev.message) or "").startswith("refused by merge"):
                self.verification_failures.inc()
        for stage in ("profile", "merge"):
            if getattr(new, stage).attempt > max(getattr(old, stage).attempt, 1):
                self.retries.labels(stage=stage).inc()
        merge = new.merge
        if merge.state == "Succeeded" and old.merge.state != "Succeeded":
            included = set(merge.included or [])
            self.bytes_verified.inc(sum((p.artifact.bytes or 0) for p in new.partitions
                                        if p.name in included and p.artifact))
            if merge.start_time and merge.completion_time:
                seconds = (from_rfc3339(merge.completion_time)
                           - from_rfc3339(merge.start_time)).total_seconds()
                self.merge_duration.observe(max(seconds, 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def error_kind(error: BaseException) -> str:
    """A bounded label for an exception: spec, transient, api or internal."""
    from meritrun.errors import SpecError, TransientError

    from .kubeapi import ApiError

    if isinstance(error, SpecError):
        return "spec"
    if isinstance(error, TransientError):
        return "transient"
    if isinstance(error, ApiError):
        return "api"
    return "internal"


def phase_counts(metrics: Metrics) -> Mapping[str, float]:
    """Current value of meritrun_runs per phase (for tests and the bench)."""
    return {phase: metrics.registry.get_sample_value("meritrun_runs", {"phase": phase}) or 0.0
            for phase in PHASES}
