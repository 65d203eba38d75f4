"""Site grants on a real MinIO server, issued through its admin API (`MinioIssuer`).

A site's key reads its assignment and the base model and writes only its attempt's prefix;
a re-issue rotates it, a revoke ends it, and MinIO holds the expiration the grant asked for.
MinIO refuses service-account expirations under 15 minutes, so the test that waits for one
to pass runs only when MERITRUN_LONG_TESTS=1 (it takes 16 minutes); the default suite checks
that MinIO recorded the expiration and enforces its own lower bound.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from support.minio import MinioServer

from meritrun.access import offer_assignment, offer_partition, open_as_site
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import RunId
from meritrun.assignment import SiteGrant, build_train_assignment, read_assignment
from meritrun.errors import StorageError
from meritrun.iam import issuer_from_env
from meritrun.minio_issuer import MinioIssuer, minio_expiration, service_account_key
from meritrun.storage import RetryPolicy, open_storage

RUN = RunId("mio", "u1")


@pytest.fixture(scope="module")
def hub(minio: MinioServer):
    bucket = minio.make_bucket()
    admin = minio.client()
    for name in ("config.json", "model.safetensors"):
        admin.put_object(bucket, f"models/base/{name}", io.BytesIO(b"{}"), 2)
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": f"s3://{bucket}/models/base"},
        "storage": {"uri": f"s3://{bucket}", "endpoint": minio.endpoint},
        "data": {"sources": [{"name": "copy", "site": "a"}, {"name": "sort", "site": "b"}]},
        "sites": [{"name": "a", "deadlineSeconds": 3600}, {"name": "b"}],
        "partitioning": {"strategy": "bySite"},
    })
    storage = open_storage(f"s3://{bucket}", endpoint=minio.endpoint, region="us-east-1",
                           access_key=minio.access_key, secret_key=minio.secret_key)
    issuer = issuer_from_env(storage, endpoint=minio.endpoint, region="us-east-1", env={
        "MERITRUN_GRANT_ISSUER": "minio", "AWS_ACCESS_KEY_ID": minio.access_key,
        "AWS_SECRET_ACCESS_KEY": minio.secret_key})
    assert isinstance(issuer, MinioIssuer)
    now = datetime.now(timezone.utc)
    parts = {site: PartitionStatus(name=f"p{i}", index=i, sources=[src], site=site, attempt=1,
                                   state="AwaitingContribution",
                                   start_time=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
             for i, (site, src) in enumerate([("a", "copy"), ("b", "sort")])}
    grants = {site: offer_partition(RUN, spec, part, storage=storage, issuer=issuer, now=now)
              for site, part in parts.items()}
    return {"spec": spec, "storage": storage, "issuer": issuer, "grants": grants,
            "parts": parts, "bucket": bucket, "minio": minio}


def site_storage(grant: SiteGrant, root: str | None = None):
    storage = open_as_site(grant, root)
    storage.retry = RetryPolicy(attempts=1)
    return storage


def denied(action) -> StorageError:
    with pytest.raises(StorageError) as info:
        action()
    refusals = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")
    assert any(code in str(info.value) for code in refusals), str(info.value)
    return info.value


def test_a_site_reads_its_inputs_and_writes_only_its_attempt(hub, tmp_path):
    a, b = hub["grants"]["a"], hub["grants"]["b"]
    site = site_storage(a)
    assignment = read_assignment(site, a.assignment_key)
    assert assignment.output == "runs/mio/u1/partitions/p0/attempt-1"
    site_storage(a, f"s3://{hub['bucket']}").download_dir("models/base", tmp_path / "base")
    assert len(list((tmp_path / "base").iterdir())) == 2
    artifact = tmp_path / "artifact"
    (artifact / "model").mkdir(parents=True)
    (artifact / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    site.upload_dir(artifact, assignment.output)
    assert site.list_keys(assignment.output) == [f"{assignment.output}/model/model.safetensors"]
    assert hub["storage"].get_bytes(f"{assignment.output}/model/model.safetensors") == b"w" * 1000

    hub["storage"].put_bytes("runs/mio/u1/partitions/p1/attempt-1/model/w", b"B")
    denied(lambda: site.put_bytes("runs/mio/u1/partitions/p1/attempt-1/model/x", b"evil"))
    denied(lambda: site.get_bytes("runs/mio/u1/partitions/p1/attempt-1/model/w"))
    denied(lambda: site.list_keys("runs/mio/u1/partitions/p1"))
    denied(lambda: site.put_bytes("runs/mio/u1/partitions/p0/attempt-2/manifest.json", b"{}"))
    denied(lambda: site.get_bytes(b.assignment_key))  # another site's assignment
    denied(lambda: site.put_bytes(a.assignment_key, b"{}"))  # its own assignment is read-only
    denied(lambda: site.list_keys(""))
    assert hub["storage"].get_bytes("runs/mio/u1/partitions/p1/attempt-1/model/w") == b"B"


def test_rotated_and_revoked_keys_stop_working(hub):
    spec, part = hub["spec"], hub["parts"]["a"].model_copy(update={"attempt": 2})
    now = datetime.now(timezone.utc)
    first = offer_partition(RUN, spec, part, storage=hub["storage"], issuer=hub["issuer"],
                            now=now)
    second = offer_partition(RUN, spec, part, storage=hub["storage"], issuer=hub["issuer"],
                             now=now)
    assert first.credentials.access_key_id == second.credentials.access_key_id  # one identity
    out = "runs/mio/u1/partitions/p0/attempt-2"
    site_storage(second).put_bytes(f"{out}/x", b"1")
    denied(lambda: site_storage(first).put_bytes(f"{out}/y", b"1"))  # the old secret
    hub["issuer"].revoke(second.identity)
    denied(lambda: site_storage(second).put_bytes(f"{out}/z", b"1"))
    hub["issuer"].revoke(second.identity)  # revoking twice is fine


def _recorded_expiration(hub, grant: SiteGrant) -> datetime:
    info = json.loads(hub["minio"].admin().get_service_account(grant.credentials.access_key_id))
    return datetime.fromisoformat(info["expiration"].replace("Z", "+00:00"))


def test_minio_holds_the_grants_expiration(hub):
    grant = hub["grants"]["a"]  # site a has a one-hour deadline
    expected = datetime.fromisoformat(grant.expires.replace("Z", "+00:00"))
    assert abs((_recorded_expiration(hub, grant) - expected).total_seconds()) < 2
    # A grant meant to end within MinIO's 15-minute minimum gets the minimum on MinIO (the
    # hub revokes it at its deadline); MinIO itself refuses anything shorter.
    now = datetime.now(timezone.utc)
    assert minio_expiration(now + timedelta(seconds=5), now=now) == minio_expiration(
        now + timedelta(minutes=15, seconds=30), now=now)
    with pytest.raises(Exception, match="xpiration"):
        hub["minio"].admin().add_service_account(
            access_key="mrgtooshort000000000", secret_key="x" * 40,
            expiration=(now + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ"))


@pytest.mark.skipif(os.environ.get("MERITRUN_LONG_TESTS") != "1",
                    reason="waits 16 minutes for MinIO's shortest expiration: "
                           "MERITRUN_LONG_TESTS=1")
def test_an_expired_key_is_refused_by_minio(hub):
    assignment = build_train_assignment(RUN, hub["spec"], hub["parts"]["b"])
    expires = datetime.now(timezone.utc) + timedelta(minutes=15, seconds=31)
    grant = offer_assignment(assignment, storage=hub["storage"], issuer=hub["issuer"],
                             expires=expires)
    site = site_storage(grant)
    site.put_bytes(f"{assignment.output}/early", b"ok")
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 5)
    denied(lambda: site.put_bytes(f"{assignment.output}/late", b"too late"))
    denied(lambda: site.get_bytes(grant.assignment_key))


def test_the_key_is_stable_short_and_never_logged(hub, caplog):
    caplog.set_level(logging.DEBUG)
    assert service_account_key("meritrun-mio-a-p0-a1") == service_account_key(
        "meritrun-mio-a-p0-a1")
    assert len(service_account_key("x" * 200)) == 20  # MinIO's access-key limit
    part = hub["parts"]["b"].model_copy(update={"attempt": 4})
    grant = offer_partition(RUN, hub["spec"], part, storage=hub["storage"],
                            issuer=hub["issuer"], now=datetime.now(timezone.utc))
    secret = grant.credentials.secret_access_key.get_secret_value()
    assert len(secret) == 40 and secret not in caplog.text and secret not in repr(grant)
