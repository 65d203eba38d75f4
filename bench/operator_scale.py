"""Operator scale on the real control plane: N MeritRuns of K partitions applied at once.

What it measures (the operator's histograms count from the release on):

- all_jobs_s: from the release of every run at once until all N*K partition Jobs exist: the
  API server's completion of the last creation, from its audit log (all_jobs_seen_s: when
  the bench, reading the log every 0.2 s, saw it). The runs are first applied suspended
  (`kubectl apply`), so the bench can write their plans under their uids; the release is
  `suspend: false` sent for all of them at once (16 client threads: kubectl applies one
  object after another, and on a loaded machine its 2N sequential calls alone take longer
  than the target);
- reconcile_round p50/p99 (THE reconcile latency of the target, as controller-runtime's
  reconcile time is the Reconcile call's): one round in its worker thread, wall time, from
  its start to its decision with every action carried out or handed on: read the run (kopf's
  live body) and its Jobs (the watch's store), read its storage (S3), decide, hand the Job
  creations to the pool (`meritrun_reconcile_duration_seconds`, interpolated within buckets);
- reconcile_round_cpu p50/p99: the CPU time of the round's thread in it (our compute; the
  rest of its wall time it waited: for S3, for the CPU, for the GIL), `..._cpu_seconds`;
- round_phase_mean_ms / round_phase_p99_ms: where a round's time goes
  (`meritrun_reconcile_phase_seconds`: run, jobs, storage, grants; decide is the rest);
- reconcile_handler p50/p99: one handler's call of a round, wall time, from asking for the
  round to its outcome: the round plus its waits for the run's lock, the run's previous
  commit and a worker thread (`meritrun_reconcile_latency_seconds`);
- commit p50/p99: what a round hands on, after it: its Job creations (ConfigMap, Job each,
  all at once), then its status write (`meritrun_reconcile_commit_seconds`);
- the operator's peak resident memory (VmHWM) and its API requests by verb and resource (the
  API server's audit log);
- timeline_s: when the operator's writes after the release completed, by verb and resource
  (first, median, last, from the audit log): where the time until all Jobs went;
- cpu_s_until_all_jobs: CPU seconds each process used from the release to all_jobs_s (the
  operator, the bench with its node stand-in, etcd, kube-apiserver, the controller manager);
- floor_s: the same partition ConfigMaps and Jobs (the ConfigMaps first) created by a plain
  client (16 threads) in a fresh namespace after the operator stopped: what this API server
  takes on this machine at best.

The control plane is the tests' one (etcd, kube-apiserver with RBAC, kube-controller-manager;
binaries from scripts/kube-bins.sh); the operator authenticates as the chart's ServiceAccount.
The node runs nothing (the Job controller's pods stay pending), and the profile stage is
short-circuited: the bench writes each run's plan.json into S3 (SeaweedFS) first, so after
the release a run's first round creates its profile Job, its next one (woken by that Job's
watch event) asks for the plan (in the background: the Job is running), and the read that
finds it wakes the run, whose next round creates its K partition Jobs.

    python bench/operator_scale.py [--runs 50] [--partitions 8] [--workers 4] [--create-threads 16]
                                   [--no-floor] [--keep-audit FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.apiclient import Api  # noqa: E402
from support.controlplane import ControlPlane  # noqa: E402
from support.kube import KubeCluster, OperatorProcess, wait_until  # noqa: E402
from support.kubelet import NodeOptions  # noqa: E402
from support.seaweed import SeaweedServer  # noqa: E402

from meritrun.artifacts import RunId, plan_prefix  # noqa: E402
from meritrun.stages import Plan, PlannedPartition  # noqa: E402


def run_doc(name: str, *, bucket: str, endpoint: str, partitions: int) -> dict:
    return {"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": f"s3://{bucket}/models/base"},
                     "data": {"uri": f"s3://{bucket}/data/train.jsonl"},
                     "storage": {"endpoint": endpoint, "bucket": bucket,
                                 "secretRef": {"name": "meritrun-storage"}},
                     "partitioning": {"strategy": "random", "partitions": partitions}}}


def write_plan(storage, run: RunId, partitions: int) -> None:
    plan = Plan(strategy="random", run_uid=run.uid, partitions=[
        PlannedPartition(name=f"p{i}", index=i, sources=[f"s{i}"], tokens=1000)
        for i in range(partitions)])
    storage.put_bytes(f"{plan_prefix(run, 1)}/plan.json", plan.model_dump_json().encode())


def histogram_quantiles(exposition: str, name: str, qs: tuple[float, ...]) -> list[float]:
    """Quantiles from cumulative buckets summed over labels (linear within a bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    edges = sorted(buckets)
    if not edges:
        return [float("nan")] * len(qs)
    total = buckets[edges[-1]]
    out = []
    for q in qs:
        rank, prev_edge, prev_count = q * total, 0.0, 0.0
        for edge in edges:
            if buckets[edge] >= rank:
                if edge == float("inf"):
                    out.append(prev_edge)
                    break
                share = (rank - prev_count) / max(buckets[edge] - prev_count, 1e-9)
                out.append(prev_edge + share * (edge - prev_edge))
                break
            prev_edge, prev_count = edge, buckets[edge]
    return out


def since(after: str, before: str) -> str:
    """The exposition's counters and histograms counted from `before` on (the release): the
    suspended runs' first rounds, before it, are not the figures (they also open the first
    S3 client, about a second once per operator and storage)."""
    def sample(line: str) -> tuple[str, float] | None:
        if not line or line.startswith("#"):
            return None
        key, _, value = line.rpartition(" ")
        return key, float(value)

    base = dict(filter(None, map(sample, before.splitlines())))
    out = []
    for line in after.splitlines():
        found = sample(line)
        out.append(line if found is None else f"{found[0]} {found[1] - base.get(found[0], 0)}")
    return "\n".join(out) + "\n"


def phase_figures(exposition: str) -> dict[str, tuple[float, float]]:
    """Per round phase: mean and p99 in ms (meritrun_reconcile_phase_seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "meritrun_reconcile_phase_seconds_sum":
                sums[s.labels["phase"]] = s.value
            elif s.name == "meritrun_reconcile_phase_seconds_count":
                counts[s.labels["phase"]] = s.value
    out = {}
    for phase, total in sums.items():
        one = "\n".join(line for line in exposition.splitlines()
                        if f'phase="{phase}"' in line)
        (p99,) = histogram_quantiles(one, "meritrun_reconcile_phase_seconds", (0.99,))
        out[phase] = (round(1000 * total / max(counts.get(phase, 0.0), 1.0), 1),
                      round(1000 * p99, 1))
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_kind(event: dict) -> str:
    """An audit event's verb and resource[/subresource]."""
    return f"{event['verb']} {event['resource']}" + (
        f"/{event['subresource']}" if event["subresource"] else "")


def epoch(stamp: str) -> float:
    """An audit timestamp (RFC 3339, UTC) as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def request_breakdown(events: list[dict]) -> dict[str, int]:
    """Audit events counted by verb and resource[/subresource], most frequent first."""
    return dict(Counter(request_kind(e) for e in events).most_common())


def bare_copy(obj: dict, kind: str) -> dict:
    """A Job or ConfigMap the operator made, as a client would send it (no server fields)."""
    meta = obj["metadata"]
    out = {"apiVersion": "v1" if kind == "ConfigMap" else "batch/v1", "kind": kind,
           "metadata": {"name": meta["name"], "labels": meta.get("labels") or {}}}
    if kind == "ConfigMap":
        return {**out, "data": obj.get("data") or {}}
    spec = json.loads(json.dumps(obj["spec"]))
    spec.pop("selector", None)
    labels = spec["template"]["metadata"].get("labels") or {}
    spec["template"]["metadata"]["labels"] = {
        k: v for k, v in labels.items() if "controller-uid" not in k and "job-name" not in k}
    return {**out, "spec": spec}


def apiserver_floor(api: Api, namespace: str, configmaps: list[dict], jobs: list[dict],
                    threads: int = 16) -> float:
    """Seconds a plain client takes to create these ConfigMaps, then these Jobs, 16 at a
    time."""
    def create(obj: dict) -> None:
        plural = "configmaps" if obj["kind"] == "ConfigMap" else "jobs"
        base = "/api/v1" if plural == "configmaps" else "/apis/batch/v1"
        api.create(f"{base}/namespaces/{namespace}/{plural}", obj)

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, configmaps))
        list(pool.map(create, jobs))
    return time.monotonic() - start


class CreatedJobs:
    """The partition Jobs the operator created (201), from the audit log as it grows: when
    each creation completed (wall clock). Polling the API server with a LIST of 400 Jobs
    every 0.2 s cost it more than the floor's creations, and its answer came late."""

    def __init__(self, audit_log: Path, user: str) -> None:
        self.audit_log, self.user = audit_log, user
        self.offset, self.times, self._partial = 0, [], b""

    def poll(self) -> int:
        with self.audit_log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if (event.get("stage") == "ResponseComplete" and event.get("verb") == "create"
                    and ref.get("resource") == "jobs" and not ref.get("subresource")
                    and (event.get("responseStatus") or {}).get("code") == 201
                    and event["user"].get("username") == self.user
                    and "-profile-" not in (ref.get("name") or "")):
                self.times.append(epoch(event["stageTimestamp"]))
        return len(self.times)


def timeline(requests: list[dict], released: float) -> dict[str, list[float]]:
    """When the operator's writes (its audit events) completed, in seconds after the
    release, by verb and resource: first, median, last."""
    times: dict[str, list[float]] = {}
    for e in requests:
        if e["verb"] in ("create", "patch", "update", "delete"):
            times.setdefault(request_kind(e), []).append(epoch(e["done"]) - released)
    out = {}
    for kind, seen in sorted(times.items()):
        seen = sorted(t for t in seen if t >= 0)
        if seen:
            out[kind] = [round(seen[0], 2), round(seen[len(seen) // 2], 2), round(seen[-1], 2)]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the operator and the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)  # the operator's default
    parser.add_argument("--create-threads", type=int, default=16)  # the operator's default
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-floor", action="store_true", help="skip the plain-client floor")
    parser.add_argument("--keep-audit", type=Path, help="copy the API server's audit log here")
    args = parser.parse_args(argv)
    expected = args.runs * args.partitions
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp, SeaweedServer() as s3:
        from meritrun.storage import open_storage

        bucket = s3.make_bucket()
        storage = open_storage(f"s3://{bucket}", endpoint=s3.endpoint, access_key=s3.access_key,
                               secret_key=s3.secret_key)
        names = [f"scale-{i:03d}" for i in range(args.runs)]
        creds = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        plane = ControlPlane(Path(tmp) / "controlplane").start()
        cluster = KubeCluster(plane, Path(tmp) / "scale", prefix="scale").start()
        operator = OperatorProcess(cluster, env={**creds, "MERITRUN_RESYNC_SECONDS": "30",
                                                 "MERITRUN_WORKERS": str(args.workers),
                                                 "MERITRUN_CREATE_THREADS":
                                                     str(args.create_threads),
                                                 "MERITRUN_LOG_LEVEL": "WARNING"})
        ns = cluster.namespace
        try:
            cluster.start_node(NodeOptions(run=False))
            cluster.create_secret("meritrun-storage", creds)
            operator.start()
            docs = [run_doc(n, bucket=bucket, endpoint=s3.endpoint, partitions=args.partitions)
                    for n in names]
            for doc in docs:  # suspended until their plans are in storage
                doc["spec"]["suspend"] = True
            cluster.kubectl("apply", "-f", "-", timeout=120, stdin=yaml.safe_dump_all(docs))
            # The profile stage's plan, where the run's uid (known once created) puts it.
            for obj in cluster.objects("merit.run/v1alpha1/meritruns"):
                meta = obj["metadata"]
                write_plan(storage, RunId(meta["name"], meta["uid"]), args.partitions)
            time.sleep(3)  # the suspended runs' first rounds are done: a quiet start
            metrics_before = operator.metrics_text()
            path = f"/apis/merit.run/v1alpha1/namespaces/{ns}/meritruns"
            load_before = load()
            pids = {"operator": operator.proc.pid, "bench+node": os.getpid(),
                    **{name: p.proc.pid for name, p in plane.procs.items()}}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            released = time.time()
            start = time.monotonic()  # all runs released at once, as many users would
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: plane.api.merge_patch(
                    f"{path}/{n}", {"spec": {"suspend": False}}), names))
            applied = time.monotonic() - start

            def partition_jobs() -> int:
                return len(plane.api.list(f"/apis/batch/v1/namespaces/{ns}/jobs",
                                          labels="merit.run/stage=train"))

            created = CreatedJobs(plane.audit_log, cluster.operator_user)
            try:  # the audit log says when each Job was created, at no cost to the server
                wait_until(lambda: created.poll() >= expected, timeout=args.timeout,
                           interval=0.2, what=f"{expected} partition Jobs")
                assert partition_jobs() == expected, "the audit log and the server disagree"
            except AssertionError:
                sample = cluster.objects("merit.run/v1alpha1/meritruns")[0]
                print(f"{partition_jobs()} of {expected} partition Jobs; a run's status: "
                      f"{json.dumps(sample.get('status'))[:1500]}", file=sys.stderr)
                print(operator.log()[-3000:], file=sys.stderr)
                raise
            seen = time.monotonic() - start
            all_jobs = sorted(created.times)[expected - 1] - released
            load_during = load()
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 1)
                   for name, pid in pids.items()}
            time.sleep(3)  # let in-flight rounds finish before reading the histograms
            exposition = since(operator.metrics_text(), metrics_before)
            p50, p99 = histogram_quantiles(exposition, "meritrun_reconcile_duration_seconds",
                                           (0.5, 0.99))
            h50, h99 = histogram_quantiles(exposition, "meritrun_reconcile_latency_seconds",
                                           (0.5, 0.99))
            u50, u99 = histogram_quantiles(exposition, "meritrun_reconcile_cpu_seconds",
                                           (0.5, 0.99))
            c50, c99 = histogram_quantiles(exposition, "meritrun_reconcile_commit_seconds",
                                           (0.5, 0.99))
            phases = phase_figures(exposition)
            rounds = sum(float(line.split()[-1]) for line in exposition.splitlines()
                         if line.startswith("meritrun_reconcile_total{"))
            requests = cluster.requests()
            results = {
                "runs": args.runs, "partitions_per_run": args.partitions,
                "workers": args.workers, "create_threads": args.create_threads,
                "load_before": load_before,
                "load_during": load_during, "release_s": round(applied, 2),
                "all_jobs_s": round(all_jobs, 2), "all_jobs_seen_s": round(seen, 2),
                "reconcile_rounds": int(rounds),
                "reconcile_round_p50_ms": round(p50 * 1000, 1),
                "reconcile_round_p99_ms": round(p99 * 1000, 1),
                "reconcile_round_cpu_p50_ms": round(u50 * 1000, 1),
                "reconcile_round_cpu_p99_ms": round(u99 * 1000, 1),
                "round_phase_mean_ms": {k: v[0] for k, v in phases.items()},
                "round_phase_p99_ms": {k: v[1] for k, v in phases.items()},
                "reconcile_handler_p50_ms": round(h50 * 1000, 1),
                "reconcile_handler_p99_ms": round(h99 * 1000, 1),
                "commit_p50_ms": round(c50 * 1000, 1),
                "commit_p99_ms": round(c99 * 1000, 1),
                "operator_peak_rss_mib": round(peak_rss_mib(operator.proc.pid), 1),
                "operator_api_requests": len(requests),
                "duplicate_jobs": sum(n - 1 for n in cluster.created("jobs").values()),
                "cpu_s_until_all_jobs": cpu,
                "timeline_s": timeline(requests, released),
            }
            operator.stop()
            print(json.dumps(results), flush=True)  # the operator's figures, come what may
            if not args.no_floor:
                jobs = plane.api.list(f"/apis/batch/v1/namespaces/{ns}/jobs",
                                      labels="merit.run/stage=train")
                cms = plane.api.list(f"/api/v1/namespaces/{ns}/configmaps",
                                     labels="merit.run/stage=train")
                floor_ns = plane.create_namespace("floor")
                plane.node.configure(floor_ns, NodeOptions(run=False))
                results["floor_s"] = round(apiserver_floor(
                    plane.api, floor_ns, [bare_copy(c, "ConfigMap") for c in cms],
                    [bare_copy(j, "Job") for j in jobs]), 2)
            results["requests"] = request_breakdown(requests)
        finally:
            operator.stop()
            Path("/tmp/operator-scale-last.log").write_text(operator.log())
            if args.keep_audit and plane.audit_log.exists():
                args.keep_audit.write_bytes(plane.audit_log.read_bytes())
            plane.stop()  # the whole control plane goes: no need to delete the namespace
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
