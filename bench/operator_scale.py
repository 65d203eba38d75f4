"""Operator scale on the real control plane: N MeritRuns of K partitions applied at once.

What it measures: the time from releasing all runs at once (they are applied suspended, so the
bench can write their plans under their uids first, then unsuspended together) until every
partition Job exists, the reconcile round duration (p50/p99, interpolated from the operator's
own histogram), the operator's peak resident memory (VmHWM), and its API request count (from
the API server's audit log). The control plane is the tests' one (etcd, kube-apiserver with
RBAC, kube-controller-manager; binaries from scripts/kube-bins.sh); the operator authenticates
as the chart's ServiceAccount. The node runs nothing (the Job controller's pods stay pending),
and the profile stage is short-circuited: the bench writes each run's plan.json into S3
(SeaweedFS) first, so a run's second round finds its plan and creates its K partition Jobs.

    python bench/operator_scale.py [--runs 50] [--partitions 8] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the operator and the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
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
        operator = OperatorProcess(cluster, env={**creds, "MERITRUN_RESYNC_SECONDS": "10",
                                                 "MERITRUN_WORKERS": str(args.workers),
                                                 "MERITRUN_LOG_LEVEL": "WARNING"})
        try:
            cluster.start_node(NodeOptions(run=False))
            cluster.create_secret("meritrun-storage", creds)
            operator.start()
            docs = [run_doc(n, bucket=bucket, endpoint=s3.endpoint, partitions=args.partitions)
                    for n in names]
            for doc in docs:  # suspended until their plans are in storage
                doc["spec"]["suspend"] = True
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", timeout=120, stdin=yaml.safe_dump_all(docs))
            applied = time.monotonic() - t0
            # The profile stage's plan, where the run's uid (known once created) puts it.
            runs = cluster.objects("merit.run/v1alpha1/meritruns")
            for obj in runs:
                meta = obj["metadata"]
                write_plan(storage, RunId(meta["name"], meta["uid"]), args.partitions)
            path = f"/apis/merit.run/v1alpha1/namespaces/{cluster.namespace}/meritruns"
            start = time.monotonic()  # all runs released at once
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda o: plane.api.merge_patch(
                    f"{path}/{o['metadata']['name']}", {"spec": {"suspend": False}}), runs))

            unsuspended = time.monotonic()

            def partition_jobs() -> int:
                return len(plane.api.list(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs",
                                          labels="merit.run/stage=train"))

            try:
                wait_until(lambda: partition_jobs() >= expected, timeout=args.timeout,
                           interval=0.5, what=f"{expected} partition Jobs")
            except AssertionError:
                sample = cluster.objects("merit.run/v1alpha1/meritruns")[0]
                print(f"{partition_jobs()} of {expected} partition Jobs; a run's status: "
                      f"{json.dumps(sample.get('status'))[:1500]}", file=sys.stderr)
                print(operator.log()[-3000:], file=sys.stderr)
                raise
            all_jobs = time.monotonic() - start
            time.sleep(3)  # let in-flight rounds finish before reading the histogram
            exposition = operator.metrics_text()
            p50, p99 = histogram_quantiles(exposition, "meritrun_reconcile_duration_seconds",
                                           (0.5, 0.99))
            rounds = sum(s for s in [float(line.split()[-1]) for line in exposition.splitlines()
                                     if line.startswith("meritrun_reconcile_total{")])
            results = {
                "runs": args.runs, "partitions_per_run": args.partitions,
                "workers": args.workers, "kubectl_apply_s": round(applied, 2),
                "unsuspend_s": round(unsuspended - start, 2),
                "all_partition_jobs_s": round(all_jobs, 2),
                "reconcile_rounds": int(rounds), "reconcile_p50_ms": round(p50 * 1000, 1),
                "reconcile_p99_ms": round(p99 * 1000, 1),
                "operator_peak_rss_mib": round(peak_rss_mib(operator.proc.pid), 1),
                "operator_api_requests": len(cluster.requests()),
                "duplicate_jobs": sum(n - 1 for n in cluster.created("jobs").values()),
            }
        finally:
            operator.stop()
            plane.stop()  # the whole control plane goes: no need to delete the namespace
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
