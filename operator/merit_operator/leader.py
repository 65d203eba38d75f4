"""Leader election with a coordination.k8s.io/v1 Lease: of N operator replicas one acts.

The replica holding the Lease runs kopf; the others wait (serving only /healthz) and take the
Lease over when its holder stops renewing it. The rules are client-go's: a follower judges
expiry by its own clock, from when it last saw the Lease change (never by comparing its clock
with the holder's `renewTime`); every write carries the `resourceVersion` it read, so of two
replicas racing for a free Lease the API server lets one win (409 for the other). A leader that
cannot renew within the renew deadline exits at once: by then a follower may be about to take
over, and two actors are worse than a restart. On a clean stop the Lease is released (holder
cleared) so a follower takes over without waiting out the duration.

Why not kopf's peering: it is kopf's own mechanism (its own cluster-scoped or namespaced
custom resource, priorities, and freezing), not a Lease, and tools and alerts that know
Kubernetes leader election read Leases.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from meritrun.errors import MeritRunError

from .kubeapi import ApiConfig, ApiError, KubeApi
from .settings import Settings

log = logging.getLogger(__name__)
Step = Literal["create", "renew", "take", "wait"]


@dataclass(frozen=True)
class LeaseTiming:
    """Seconds; client-go's usual proportions (duration > renew deadline > retry period)."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


def lease_path(namespace: str, name: str | None = None) -> str:
    return (f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
            + (f"/{name}" if name else ""))


def micro_time(now: datetime) -> str:
    """The MicroTime format Lease times are written in."""
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """The pod's name (its hostname) and a random tail: a restarted pod is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def lease_step(lease: dict[str, Any] | None, *, me: str, unchanged_for: float,
               duration: float) -> Step:
    """What a candidate does with the Lease as read, having seen it unchanged for that long."""
    if lease is None:
        return "create"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == me:
        return "renew"
    if not holder or unchanged_for > float(spec.get("leaseDurationSeconds") or duration):
        return "take"
    return "wait"


def lease_spec(lease: dict[str, Any] | None, *, me: str, step: Step, now: datetime,
               duration: float) -> dict[str, Any]:
    """The Lease spec a step writes (acquireTime and transitions move only on a change)."""
    old = (lease or {}).get("spec") or {}
    stamp = micro_time(now)
    spec = {"holderIdentity": me, "leaseDurationSeconds": int(duration), "renewTime": stamp,
            "acquireTime": old.get("acquireTime") or stamp,
            "leaseTransitions": int(old.get("leaseTransitions") or 0)}
    if step == "take":
        spec["acquireTime"] = stamp
        spec["leaseTransitions"] += 1
    return spec


class LeaseElector:
    """Acquire, renew and release one Lease through the operator's REST client."""

    def __init__(self, api: KubeApi, *, namespace: str, name: str, identity: str,
                 timing: LeaseTiming = LeaseTiming(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.timing, self.clock = timing, clock
        self._seen: tuple[str | None, float] | None = None  # (resourceVersion, first seen)

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.api.get(lease_path(self.namespace, self.name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def _unchanged_for(self, lease: dict[str, Any] | None) -> float:
        version = ((lease or {}).get("metadata") or {}).get("resourceVersion")
        now = self.clock()
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, now)
        return now - self._seen[1]

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        lease = self._read()
        step = lease_step(lease, me=self.identity, unchanged_for=self._unchanged_for(lease),
                          duration=self.timing.duration)
        if step == "wait":
            return False
        spec = lease_spec(lease, me=self.identity, step=step, now=datetime.now(timezone.utc),
                          duration=self.timing.duration)
        try:
            if lease is None:
                self.api.create(lease_path(self.namespace), {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec})
            else:  # optimistic: the API server refuses it (409) if the Lease moved meanwhile
                self.api.merge_patch(lease_path(self.namespace, self.name), {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": spec})
        except ApiError as e:
            if e.status == 409:
                return False  # another candidate wrote first
            raise
        if step != "renew":
            log.info("leader election: %s now holds lease %s/%s", self.identity,
                     self.namespace, self.name)
        return True

    def holder(self) -> str | None:
        lease = self._read()
        return ((lease or {}).get("spec") or {}).get("holderIdentity") or None

    def wait_for_leadership(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or stop is set (False)."""
        announced = None
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    return True
                holder = self.holder()
                if holder != announced:
                    log.info("leader election: %s leads; %s waits", holder, self.identity)
                    announced = holder
            except MeritRunError as e:
                log.warning("leader election: %s", str(e)[:300])
            stop.wait(self.timing.retry_period)
        return False

    def keep_renewing(self, stop: threading.Event, on_lost: Callable[[], None]) -> None:
        """Renew every retry period until stop; on_lost() if no renewal succeeds in time."""
        last_ok = self.clock()
        while not stop.wait(self.timing.retry_period):
            try:
                if self.try_acquire_or_renew():
                    last_ok = self.clock()
                    continue
                log.error("leader election: lease %s/%s was taken over", self.namespace,
                          self.name)
            except MeritRunError as e:
                log.warning("leader election: renewal failed: %s", str(e)[:300])
                if self.clock() - last_ok < self.timing.renew_deadline:
                    continue
            on_lost()
            return

    def release(self) -> None:
        """Give the Lease up (holder cleared) so a follower need not wait out the duration."""
        try:
            lease = self._read()
            if ((lease or {}).get("spec") or {}).get("holderIdentity") != self.identity:
                return
            assert lease is not None
            self.api.merge_patch(lease_path(self.namespace, self.name), {
                "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1}})
            log.info("leader election: %s released the lease", self.identity)
        except MeritRunError as e:  # the Lease then simply expires
            log.warning("leader election: release failed: %s", str(e)[:300])


def elector_for(settings: Settings, config: ApiConfig) -> LeaseElector:
    """The elector the settings ask for; the Lease lives in the operator's own namespace."""
    namespace = settings.lease_namespace or config.namespace or "default"
    timing = LeaseTiming(duration=settings.lease_duration_seconds,
                         renew_deadline=settings.lease_renew_deadline_seconds,
                         retry_period=settings.lease_retry_period_seconds)
    if not timing.duration > timing.renew_deadline > timing.retry_period > 0:
        raise MeritRunError("lease timing must satisfy duration > renew deadline > retry "
                            "period > 0 (MERITRUN_LEASE_*_SECONDS)")
    return LeaseElector(KubeApi(config, token_reread_seconds=settings.token_reread_seconds),
                        namespace=namespace, name=settings.lease_name,
                        identity=default_identity(), timing=timing)


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        ok = self.path.split("?")[0] == "/healthz"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"standby\n" if ok else b"")

    def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a line
        pass


@contextmanager
def standby_health(port: int) -> Iterator[None]:
    """/healthz while waiting for the Lease (kopf serves it once this replica leads)."""
    if not port:
        yield
        return
    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), _Healthy)
    except OSError as e:  # waiting is still right; only the probe is missing
        log.warning("leader election: no standby /healthz on port %d: %s", port, e)
        yield
        return
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
