"""Scoped site grants against a real SeaweedFS server with its IAM API writable.

Two pull sites, one partition each. A site's grant must let it read its assignment and the
base model and write its own partition's current attempt, and nothing else: not another
partition's prefix, not another attempt, not another site's assignment. Expired and revoked
grants are refused by the server itself. No secret may reach a status, an event or a log.
"""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import datetime, timedelta, timezone

import pytest
from support.seaweed import SeaweedServer

from meritrun.access import (
    grant_identity,
    grant_scope,
    offer_assignment,
    offer_partition,
    open_as_site,
    scope_policy,
)
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import RunId, checkpoint_prefix
from meritrun.assignment import SiteGrant, build_train_assignment, parse_grant, read_assignment
from meritrun.errors import StorageError
from meritrun.iam import IamIssuer
from meritrun.storage import RetryPolicy

RUN = RunId("acc", "u1")
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def server():
    with SeaweedServer(extra_args=["-s3.iam.readOnly=false"]) as s:
        yield s


@pytest.fixture(scope="module")
def hub(server):
    """A run on its own bucket: base model, one partition per site, the admin's storage."""
    bucket = server.make_bucket()
    admin = server.client()
    for name in ("config.json", "model.safetensors"):
        admin.put_object(bucket, f"models/base/{name}", io.BytesIO(b"{}"), 2)
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": f"s3://{bucket}/models/base"},
        "storage": {"uri": f"s3://{bucket}", "endpoint": server.endpoint},
        "data": {"sources": [{"name": "copy", "site": "a"}, {"name": "sort", "site": "b"}]},
        "sites": [{"name": "a", "deadlineSeconds": 3600}, {"name": "b"}],
        "partitioning": {"strategy": "bySite"},
    })
    from meritrun.storage import open_storage

    storage = open_storage(f"s3://{bucket}", endpoint=server.endpoint, region="us-east-1",
                           access_key=server.access_key, secret_key=server.secret_key)
    issuer = IamIssuer(server.endpoint, access_key=server.access_key,
                       secret_key=server.secret_key)
    now = datetime.now(timezone.utc)
    start = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = {site: PartitionStatus(name=f"p{i}", index=i, sources=[src], site=site, attempt=1,
                                   state="AwaitingContribution", start_time=start)
             for i, (site, src) in enumerate([("a", "copy"), ("b", "sort")])}
    grants = {site: offer_partition(RUN, spec, part, storage=storage, issuer=issuer, now=now)
              for site, part in parts.items()}
    return {"spec": spec, "storage": storage, "issuer": issuer, "grants": grants,
            "parts": parts, "bucket": bucket, "server": server}


def site_storage(grant: SiteGrant, root: str | None = None):
    storage = open_as_site(grant, root)
    storage.retry = NO_RETRY  # a refusal is final; no need to wait on retries
    return storage


def denied(action) -> StorageError:
    with pytest.raises(StorageError) as info:
        action()
    assert "AccessDenied" in str(info.value) or "InvalidAccessKeyId" in str(info.value)
    return info.value


def test_site_reads_its_assignment_and_base_and_writes_its_own_attempt(hub, tmp_path):
    grant = hub["grants"]["a"]
    site = site_storage(grant)
    assignment = read_assignment(site, grant.assignment_key)
    assert (assignment.partition, assignment.sources, assignment.output) == (
        "p0", ["copy"], "runs/acc/u1/partitions/p0/attempt-1")
    base_root = f"s3://{hub['bucket']}"
    site_storage(grant, base_root).download_dir("models/base", tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "config.json", "model.safetensors"]

    artifact = tmp_path / "artifact"
    (artifact / "model").mkdir(parents=True)
    (artifact / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    (artifact / "train_log.json").write_text("{}")
    site.upload_dir(artifact, assignment.output)
    site.put_bytes(f"{assignment.output}/manifest.json", b"{}")
    assert site.list_keys(assignment.output) == [
        f"{assignment.output}/{k}" for k in ("manifest.json", "model/model.safetensors",
                                             "train_log.json")]
    assert site.stat(f"{assignment.output}/train_log.json").bytes == 2
    assert site.delete_prefix(f"{assignment.output}/manifest.json") == 1  # its own retry
    # What the site wrote is what the hub reads.
    assert hub["storage"].get_bytes(f"{assignment.output}/model/model.safetensors") == b"w" * 1000


def test_site_cannot_touch_other_partitions_attempts_or_assignments(hub):
    a, b = hub["grants"]["a"], hub["grants"]["b"]
    hub["storage"].put_bytes("runs/acc/u1/partitions/p1/attempt-1/model/model.safetensors", b"B")
    site = site_storage(a)
    denied(lambda: site.put_bytes("runs/acc/u1/partitions/p1/attempt-1/model/x", b"evil"))
    denied(lambda: site.get_bytes("runs/acc/u1/partitions/p1/attempt-1/model/model.safetensors"))
    denied(lambda: site.list_keys("runs/acc/u1/partitions/p1"))
    denied(lambda: site.delete_prefix("runs/acc/u1/partitions/p1/attempt-1"))
    denied(lambda: site.put_bytes("runs/acc/u1/partitions/p0/attempt-2/manifest.json", b"{}"))
    denied(lambda: site.get_bytes(b.assignment_key))  # another site's assignment
    denied(lambda: site.put_bytes(a.assignment_key, b"{}"))  # rewrite its own assignment
    denied(lambda: site.list_keys(""))
    # Nothing changed for the other site.
    assert hub["storage"].get_bytes(
        "runs/acc/u1/partitions/p1/attempt-1/model/model.safetensors") == b"B"
    read_assignment(hub["storage"], a.assignment_key)


def test_site_keeps_its_partitions_checkpoints_and_no_other(hub):
    """Checkpoints outlive the attempt (artifacts.checkpoint_prefix): the site writes, lists,
    reads back and removes its own partition's, and cannot reach another partition's."""
    site = site_storage(hub["grants"]["a"])
    mine = checkpoint_prefix(RUN, "p0") + "/abc/step-00000002"
    site.put_bytes(f"{mine}/__0_0.distcp", b"shard")
    site.put_bytes(f"{mine}/meta.json", b"{}")
    assert site.list_keys(checkpoint_prefix(RUN, "p0")) == [f"{mine}/__0_0.distcp",
                                                            f"{mine}/meta.json"]
    assert site.get_bytes(f"{mine}/__0_0.distcp") == b"shard"
    assert site.delete_prefix(checkpoint_prefix(RUN, "p0")) == 2
    theirs = checkpoint_prefix(RUN, "p1") + "/abc/step-00000002/meta.json"
    hub["storage"].put_bytes(theirs, b"{}")
    denied(lambda: site.put_bytes(theirs, b"evil"))
    denied(lambda: site.get_bytes(theirs))
    denied(lambda: site.list_keys(checkpoint_prefix(RUN, "p1")))
    denied(lambda: site.delete_prefix(theirs))


def test_expired_grant_is_refused_by_the_server(hub):
    assignment = build_train_assignment(RUN, hub["spec"], hub["parts"]["b"])
    expires = datetime.now(timezone.utc) + timedelta(seconds=4)
    grant = offer_assignment(assignment, storage=hub["storage"], issuer=hub["issuer"],
                             expires=expires)
    site = site_storage(grant)
    site.put_bytes(f"{assignment.output}/early", b"ok")
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 1.5)
    assert grant.expired(datetime.now(timezone.utc))
    denied(lambda: site.put_bytes(f"{assignment.output}/late", b"too late"))
    denied(lambda: site.get_bytes(grant.assignment_key))


def test_revoked_and_rotated_grants_are_refused(hub):
    spec, part = hub["spec"], hub["parts"]["a"].model_copy(update={"attempt": 2})
    now = datetime.now(timezone.utc)
    first = offer_partition(RUN, spec, part, storage=hub["storage"], issuer=hub["issuer"],
                            now=now)
    second = offer_partition(RUN, spec, part, storage=hub["storage"], issuer=hub["issuer"],
                             now=now)  # a re-issue rotates: the first key stops working
    out = "runs/acc/u1/partitions/p0/attempt-2"
    site_storage(second).put_bytes(f"{out}/x", b"1")
    denied(lambda: site_storage(first).put_bytes(f"{out}/y", b"1"))
    hub["issuer"].revoke(second.identity)
    denied(lambda: site_storage(second).put_bytes(f"{out}/z", b"1"))
    hub["issuer"].revoke(second.identity)  # idempotent: revoking twice is fine


def test_credentials_never_reach_status_events_or_logs(hub, caplog):
    caplog.set_level(logging.DEBUG)
    spec, part = hub["spec"], hub["parts"]["b"].model_copy(update={"attempt": 3})
    grant = offer_partition(RUN, spec, part, storage=hub["storage"], issuer=hub["issuer"],
                            now=datetime.now(timezone.utc))
    secret = grant.credentials.secret_access_key.get_secret_value()
    assert len(secret) >= 20
    shown = json.dumps(grant.public_view())
    assert secret not in shown and "credentials" not in shown
    assert grant.identity in shown  # what the operator needs to revoke it later
    assert secret not in repr(grant) and secret not in str(grant)
    assert secret not in caplog.text
    # The bundle for the site does carry it, and parses back to the same grant.
    assert parse_grant(grant.bundle_json()) == grant


def test_policy_names_only_the_grants_prefixes(hub):
    assignment = build_train_assignment(RUN, hub["spec"], hub["parts"]["a"])
    scope = grant_scope(assignment, root_uri=f"s3://{hub['bucket']}/tenant")
    policy = json.dumps(scope_policy(scope))
    bucket = hub["bucket"]
    assert f"arn:aws:s3:::{bucket}/tenant/runs/acc/u1/partitions/p0/attempt-1/*" in policy
    assert f"arn:aws:s3:::{bucket}/tenant/runs/acc/u1/sites/a/p0/attempt-1/*" in policy
    assert f"arn:aws:s3:::{bucket}/models/base/*" in policy
    assert f"arn:aws:s3:::{bucket}/tenant/runs/acc/u1/partitions/p0/checkpoints/*" in policy
    assert "p1" not in policy and "attempt-2" not in policy and "s3:*" not in policy
    assert len(policy) < 2048  # the inline-policy limit of AWS, MinIO and SeaweedFS
    assert grant_identity(assignment) == "meritrun-acc-a-p0-a1"
