"""The operator's settings: one frozen object read from `MERITRUN_*` variables at startup.

Read once in `__main__` (never in decorator arguments at import time, where an env override
would silently do nothing) and handed to the handlers through kopf's memo. Every duration is
in seconds and every size in bytes, and the names say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from meritrun.errors import SpecError

PREFIX = "MERITRUN_"
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Settings:
    """Everything the operator can be told; defaults suit a production cluster."""

    # Namespaces to serve (comma-separated); empty means the whole cluster.
    namespaces: tuple[str, ...] = ()
    # kubeconfig file for the operator's own API access; empty means in-cluster credentials.
    kubeconfig: str = ""
    # Level-based reconcile: how often an active run is re-examined without any event.
    resync_seconds: float = 30.0
    # How often a finished run is re-examined (only metrics and spec changes matter then).
    idle_resync_seconds: float = 600.0
    # Retry backoff of failed stage Jobs (pipeline Policy): base * 2^(attempt-1), capped.
    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 600.0
    # Delay before retrying a reconcile round that hit a transient error (doubles, capped).
    error_backoff_seconds: float = 2.0
    error_backoff_max_seconds: float = 300.0
    # Threads running reconcile rounds. A round reads from caches and hands its writes to a
    # commit, so it is mostly our own compute (under the GIL) plus a few S3 reads: more
    # threads only interleave rounds and stretch each (bench/operator_scale: 16 threads,
    # round p99 2.2 s; 4 threads, 0.6 s, with the same time until all Jobs exist).
    workers: int = 4
    # Threads creating Jobs (each with its ConfigMap) for all rounds: a round's Jobs (one per
    # partition) are created at once, not one after another.
    create_threads: int = 16
    # A Job event wakes its run's daemon this long before the round, so that a burst of
    # events (a Job created, then its pods, then its status) costs one round, not one each.
    # Short: the round also waits for the run's previous commit, whose creations are what
    # send the bursts, and wake-ups during that wait are covered by the same round.
    wake_debounce_seconds: float = 0.1
    # Images used when the run's template names none (the chart sets both).
    trainer_image: str = "ghcr.io/meritrun/meritrun-trainer:0.1.0"
    merger_image: str = "ghcr.io/meritrun/meritrun-merger:0.1.0"
    # The interpreter inside the images, first word of every stage command.
    job_python: str = "python"
    # TCP port pod 0 of a multi-node train gang serves torchrun's rendezvous on.
    rendezvous_port: int = 29500
    # Prometheus metrics and kopf liveness endpoints (0 disables).
    metrics_port: int = 8080
    metrics_address: str = "0.0.0.0"
    health_port: int = 8081
    # Operator log level name (DEBUG, INFO, WARNING).
    log_level: str = "INFO"
    # The S3 endpoint as pull sites reach it, written into their grants (default: the run's).
    site_endpoint: str = ""
    # A token file (kubeconfig tokenFile, the in-cluster token) is read again this often.
    token_reread_seconds: float = 60.0
    # Leader election (replicas > 1): only the holder of this coordination.k8s.io Lease acts.
    leader_election: bool = False
    lease_name: str = "meritrun-operator"
    # Where the Lease lives; empty means the operator's own namespace (in-cluster or kubeconfig).
    lease_namespace: str = ""
    lease_duration_seconds: float = 15.0
    lease_renew_deadline_seconds: float = 10.0
    lease_retry_period_seconds: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `MERITRUN_<FIELD>` variables; a bad value raises SpecError naming it."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            key = PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(key, raw, f.type)
        return cls(**values)


def _convert(key: str, raw: str, type_name: object) -> object:
    text = str(type_name)
    try:
        if text.startswith("bool"):
            if raw.lower() not in BOOLEANS:
                raise ValueError(f"use one of {', '.join(sorted(BOOLEANS))}")
            return BOOLEANS[raw.lower()]
        if "tuple" in text:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if text.startswith("float"):
            value: float = float(raw)
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if text.startswith("int"):
            number = int(raw)
            if number < 0:
                raise ValueError("must not be negative")
            return number
        return raw
    except ValueError as e:
        raise SpecError(f"invalid value {raw!r}: {e}", path=key) from e
