"""One MeritRun over three places: the hub cluster, a remote cluster, and a pull site.

Two clusters on the real control plane: the hub is one namespace (the operator authenticated
as the chart's ServiceAccount, remote and pull sites enabled), the remote cluster another
namespace reached only through its own kubeconfig (a ServiceAccount token of that namespace,
in a Secret), each namespace's pods run by the node stand-in; a real SeaweedFS with its
IAM API on, the operator as a process, and the pull site as a separate `meritrun contribute`
process with its own data directory and none of the hub's credentials: it gets only the
grant the operator issued (read from the grant Secret as the hub's admin would hand it over).
The run splits by site, trains one partition on each cluster and one at the site, verifies
the site's signed contribution when it arrives, and merges all three. Then: the hub never saw
the site's data, the site's grant is revoked, no secret leaked into status, events or logs,
and the API server refused no request of the operator on either cluster (its audit log). The
remote cluster fails the partition's first attempt, so its retry is observed there too.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.kube import REMOTE_SA, KubeCluster, OperatorProcess, wait_until
from support.kube_e2e import apply, node_options, wait_phase
from support.seaweed import SeaweedServer

from meritrun.data import iter_examples, write_examples
from meritrun.keys import generate_site_key

pytestmark = pytest.mark.slow
RUN = "fed"
HUB_SOURCES, EAST_SOURCES, LAB_SOURCES = ["copy"], ["sort"], ["reverse", "upper"]
MARKER = "lab-private-7f3a"  # in every example of the site's data, and nowhere else


@pytest.fixture(scope="module")
def iam_seaweed():
    with SeaweedServer(extra_args=["-s3.iam.readOnly=false"]) as server:
        yield server


def write_site_data(tiny_mixture, path: Path) -> Path:
    """The site's sources, each prompt tagged with a marker only the site holds."""
    import dataclasses

    examples = []
    for e in iter_examples(tiny_mixture.train):
        if e.source in LAB_SOURCES:
            first = dataclasses.replace(e.turns[0], content=f"{MARKER} {e.turns[0].content}")
            examples.append(dataclasses.replace(e, turns=(first, *e.turns[1:])))
    write_examples(path, examples)
    return path


def run_doc(bucket: str, endpoint: str, public_key: str) -> dict:
    s3 = f"s3://{bucket}"
    return {
        "apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": RUN},
        "spec": {
            "baseModel": {"uri": f"{s3}/models/base"},
            "data": {"sources": [
                *({"name": s, "uri": f"{s3}/data/{s}.jsonl"} for s in HUB_SOURCES),
                *({"name": s, "uri": f"{s3}/data/{s}.jsonl", "site": "east"}
                  for s in EAST_SOURCES),
                *({"name": s, "site": "lab"} for s in LAB_SOURCES)]},
            "storage": {"endpoint": endpoint, "bucket": bucket,
                        "secretRef": {"name": "meritrun-storage"}},
            "sites": [
                {"name": "east", "mode": "kubeconfig", "secretRef": {"name": "east-kubeconfig"}},
                {"name": "lab", "mode": "pull", "deadlineSeconds": 900, "publicKey": public_key},
            ],
            "partitioning": {"strategy": "bySite", "partitions": 3},
            "training": {"method": "full", "batchSize": 8, "maxSeqLen": 64, "maxSteps": 3,
                         "secondMoments": "none"},
            "merge": {"method": "tokenWeighted", "quorum": 1.0},
            "backoffLimit": 1,
        },
    }


def contribute(grant: Path, data: Path, key: Path, workdir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HOME=str(workdir))
    return subprocess.run(
        [sys.executable, "-m", "meritrun.cli", "contribute", "--assignment", str(grant),
         "--data", str(data), "--key", str(key), "--workdir", str(workdir / "work")],
        capture_output=True, text=True, timeout=300, env=env, cwd=workdir)


@pytest.fixture(scope="module")
def federated(tmp_path_factory, control_plane, iam_seaweed, tiny_base, tiny_mixture):
    from meritrun.storage import open_storage

    tmp = tmp_path_factory.mktemp("federated")
    site_dir = tmp / "lab"
    site_dir.mkdir()
    key_path = site_dir / "lab.key"
    public_key = generate_site_key(key_path)
    data = write_site_data(tiny_mixture, site_dir / "lab.jsonl")

    s3 = iam_seaweed
    bucket = s3.make_bucket()
    hub_storage = open_storage(f"s3://{bucket}", endpoint=s3.endpoint, region="us-east-1",
                               access_key=s3.access_key, secret_key=s3.secret_key)
    hub_storage.upload_dir(tiny_base, "models/base")
    train = list(iter_examples(tiny_mixture.train))
    for source in HUB_SOURCES + EAST_SOURCES:
        path = tmp / f"{source}.jsonl"
        write_examples(path, [e for e in train if e.source == source])
        hub_storage.put_file(f"data/{source}.jsonl", path)

    creds = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    sites = ("--set", "remoteSites.enabled=true", "--set", "pullSites.enabled=true")
    hub = KubeCluster(control_plane, tmp / "hub", prefix="hub", values=sites).start()
    east = KubeCluster(control_plane, tmp / "east", prefix="east").start()
    operator = OperatorProcess(hub, env=creds)
    out: dict = {"site_dir": site_dir, "bucket": bucket, "storage": hub_storage,
                 "data": data}
    try:
        hub.start_node(node_options())
        # The remote cluster's first attempt fails: retried there, like a local Job.
        east.start_node(node_options(fail=lambda job: job.endswith("-a1")))
        for cluster in (hub, east):
            cluster.create_secret("meritrun-storage", creds)
        hub.create_secret("east-kubeconfig", {"kubeconfig": east.remote_kubeconfig()})
        operator.start()
        apply(hub, run_doc(bucket, s3.endpoint, public_key))

        # The hub's admin hands the site its grant; the site contributes on its own.
        def grant_secret():
            status = hub.run_status(RUN)
            part = next((p for p in status.get("partitions", [])
                         if p.get("site") == "lab" and p.get("grant")), None)
            return part and hub.get("v1/secrets", part["grant"])
        secret = wait_until(grant_secret, timeout=120, interval=0.5, what="the grant Secret")
        grant_path = site_dir / "grant.json"
        grant_path.write_text(base64.b64decode(secret["data"]["grant.json"]).decode())
        out["grant"] = json.loads(grant_path.read_text())
        out["contribute"] = contribute(grant_path, data, key_path, site_dir)
        assert out["contribute"].returncode == 0, out["contribute"].stderr[-3000:]

        out["status"] = wait_phase(hub, RUN, ("Succeeded", "Failed"), timeout=240)
        out["hub_jobs"] = [j["metadata"]["name"] for j in hub.objects("batch/v1/jobs")]
        out["east_jobs"] = [j["metadata"]["name"] for j in east.objects("batch/v1/jobs")]
        out["configmaps"] = [cm for c in (hub, east) for cm in c.objects("v1/configmaps")]
        out["events"] = hub.objects("v1/events")
        out["secrets_after"] = [s["metadata"]["name"] for s in hub.objects("v1/secrets")]
        out["requests"] = {"hub": hub.requests(), "east": east.requests(
            f"system:serviceaccount:{east.namespace}:{REMOTE_SA}")}
        out["namespaces"] = {"hub": hub.namespace, "east": east.namespace}
        operator.stop()
        out["operator_log"] = operator.log()
        out["objects"] = {k: hub_storage.get_bytes(k) for k in hub_storage.list_keys("runs/")}
    finally:
        operator.stop()
        east.stop()
        hub.stop()
    yield out
    s3.remove_bucket(bucket)


def test_partitions_trained_at_three_places_and_merged(federated):
    st = federated["status"]
    assert st["phase"] == "Succeeded", st.get("message")
    by_site = {p.get("site"): p for p in st["partitions"]}
    assert sorted(by_site, key=str) == sorted([None, "east", "lab"], key=str)
    assert by_site[None]["sources"] == HUB_SOURCES and by_site["east"]["sources"] == EAST_SOURCES
    assert sorted(by_site["lab"]["sources"]) == sorted(LAB_SOURCES)
    assert all(p["state"] == "Succeeded" and p["tokens"] > 0 for p in st["partitions"])
    assert sorted(st["merge"]["included"]) == sorted(p["name"] for p in st["partitions"])
    east, lab = by_site["east"]["name"], by_site["lab"]["name"]
    # The remote partition ran on the remote cluster only (failed once, retried there); the
    # site's was verified on the hub.
    assert by_site["east"]["attempt"] == 2
    assert {f"{RUN}-{east}-a1", f"{RUN}-{east}-a2"} <= set(federated["east_jobs"])
    assert not any(j.startswith(f"{RUN}-{east}-") for j in federated["hub_jobs"])
    assert f"{RUN}-{lab}-verify-a1" in federated["hub_jobs"]
    assert not any(j.startswith(f"{RUN}-{lab}-a") for j in federated["hub_jobs"]
                   + federated["east_jobs"])
    reasons = [e["reason"] for e in federated["events"]]
    assert "ContributionReceived" in reasons and "ContributionAccepted" in reasons


def test_the_hub_never_saw_the_site_data(federated):
    data_path = str(federated["data"])
    for cm in federated["configmaps"]:  # every stage's parameters, on both clusters
        text = json.dumps(cm.get("data"))
        assert data_path not in text and "lab.jsonl" not in text
    for key, blob in federated["objects"].items():
        assert MARKER.encode() not in blob, f"site data reached the hub's storage: {key}"
    assert MARKER not in federated["operator_log"]


def test_the_site_grant_is_scoped_then_revoked(federated):
    from meritrun.assignment import SiteGrant
    from meritrun.errors import StorageError
    from meritrun.storage import open_storage

    grant = SiteGrant.model_validate(federated["grant"])
    lab = next(p for p in federated["status"]["partitions"] if p.get("site") == "lab")
    assert grant.name == lab["name"] and grant.attempt == 1 and grant.credentials is not None
    assert lab["grant"] not in federated["secrets_after"]  # deleted when the artifact arrived
    creds = grant.credentials
    site = open_storage(grant.storage_root, endpoint=grant.endpoint, region="us-east-1",
                        access_key=creds.access_key_id,
                        secret_key=creds.secret_access_key.get_secret_value())
    with pytest.raises(StorageError):  # the identity is gone: its own prefix is closed too
        site.put_bytes(f"runs/{RUN}/{grant.run_uid}/partitions/{lab['name']}/attempt-1/late.txt",
                       b"x")
    with pytest.raises(StorageError):
        site.get_bytes(grant.assignment_key)


def test_no_secret_in_status_events_or_logs(federated, iam_seaweed):
    secret = federated["grant"]["credentials"]["secret_access_key"]
    for text in (json.dumps(federated["status"]), json.dumps(federated["events"]),
                 federated["operator_log"], federated["contribute"].stdout,
                 federated["contribute"].stderr):
        assert secret not in text and iam_seaweed.secret_key not in text


def test_the_server_refused_no_operator_request_on_either_cluster(federated):
    hub, east = federated["requests"]["hub"], federated["requests"]["east"]
    assert hub and east, "the audit log holds no request of the operator on a cluster"
    for reqs in (hub, east):
        refused = sorted({(r["verb"], r["resource"], r["namespace"], r["code"])
                          for r in reqs if r["code"] in (401, 403)}, key=str)
        assert not refused, f"the API server refused the operator: {refused}"
    # Pull sites' grants are Secrets the operator wrote with the chart's pullSites rights.
    assert {r["verb"] for r in hub if r["resource"] == "secrets" and r["code"] < 400} >= {
        "create", "delete"}
    assert {r["namespace"] for r in east} == {federated["namespaces"]["east"]}
