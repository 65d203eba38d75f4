"""The storage interface against real S3 servers (SeaweedFS and MinIO), and retries against a
fake one."""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.minio import MinioServer
from support.seaweed import Identity, S3Bucket, SeaweedServer

from meritrun.artifacts import FileEntry, hash_tree
from meritrun.errors import IntegrityError, ObjectNotFound, StorageError, TransientError
from meritrun.storage import (
    BucketNotFound,
    MultipartPolicy,
    RetryPolicy,
    S3Storage,
    fetch_path,
    open_storage,
)

MiB = 1 << 20


def make_tree(root: Path) -> Path:
    (root / "model" / "sub").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(200_000))
    (root / "model" / "sub" / "config.json").write_text('{"a": 1}')
    (root / "manifest.json").write_text("{}")
    return root


@pytest.fixture(params=["seaweed", "minio"])
def s3_bucket(request: pytest.FixtureRequest, seaweed: SeaweedServer,
              minio: MinioServer) -> Iterator[S3Bucket]:
    """A fresh bucket on each real server: the same storage code must work on both. (Both
    session servers are named here, so they start before any test's process-leak check.)"""
    server = {"seaweed": seaweed, "minio": minio}[request.param]
    name = server.make_bucket()
    yield S3Bucket(name, server)
    try:
        server.remove_bucket(name)
    except Exception:  # noqa: BLE001 - the server goes away with the session anyway
        pass


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MERITRUN_S3_ENDPOINT",
        "AWS_REGION",
    ):
        monkeypatch.delenv(var, raising=False)


def test_files_and_directories_round_trip_under_a_prefix(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    store = s3_bucket.open("some/prefix")
    assert store.root_uri == f"s3://{s3_bucket.name}/some/prefix"
    assert store.put_bytes("x/y.txt", b"hi").bytes == 2
    assert store.get_bytes("x/y.txt") == b"hi"
    src = make_tree(tmp_path / "src")
    uploaded = store.upload_dir(src, "runs/r/attempt-1")
    assert uploaded["model/weights.bin"].sha256 == hash_tree(src)["model/weights.bin"].sha256
    assert store.list_keys("runs/r") == [
        "runs/r/attempt-1/manifest.json",
        "runs/r/attempt-1/model/sub/config.json",
        "runs/r/attempt-1/model/weights.bin",
    ]
    raw = s3_bucket.server.client().stat_object(s3_bucket.name, "some/prefix/x/y.txt")
    assert raw.metadata.get("x-amz-meta-sha256") == store.stat("x/y.txt").sha256
    dest = store.download_dir("runs/r/attempt-1", tmp_path / "dest", expected=hash_tree(src))
    assert hash_tree(dest) == hash_tree(src)
    assert store.exists("x/y.txt") and not store.exists("x/nope")
    neighbour = "some/prefixed/not-ours"  # shares the string prefix, not the directory
    s3_bucket.server.client().put_object(s3_bucket.name, neighbour, io.BytesIO(b"n"), 1)
    assert store.delete_prefix("runs/r") == 3
    assert store.list_keys("") == ["x/y.txt"]
    assert s3_bucket.open("some").list_keys("") == ["prefix/x/y.txt", "prefixed/not-ours"]


def test_multipart_upload_with_small_parts(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.open(multipart=MultipartPolicy(threshold_bytes=5 * MiB, part_bytes=5 * MiB))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * MiB))
    info = store.put_file("big.bin", big)
    etag = s3_bucket.server.client().stat_object(s3_bucket.name, "big.bin").etag
    assert etag.endswith("-3"), etag  # three parts: 5 + 5 + 2 MiB
    assert store.stat("big.bin") == info
    out = store.get_file("big.bin", tmp_path / "out.bin", sha256=info.sha256, size=12 * MiB)
    assert out.read_bytes() == big.read_bytes()


def test_corrupted_object_is_detected(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.open()
    src = make_tree(tmp_path / "src")
    store.upload_dir(src, "p")
    evil = os.urandom(200_000)  # same size, other bytes, no sha256 metadata
    s3_bucket.server.client().put_object(
        s3_bucket.name, "p/model/weights.bin", io.BytesIO(evil), len(evil)
    )
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="model/weights.bin"):
        store.download_dir("p", dest, expected=hash_tree(src))
    assert not (dest / "model" / "weights.bin").exists()
    # Without expected hashes, the sha256 recorded at upload still catches a mismatch.
    s3_bucket.server.client().put_object(
        s3_bucket.name, "k", io.BytesIO(b"tampered"), 8, metadata={"sha256": "0" * 64}
    )
    with pytest.raises(IntegrityError):
        store.get_file("k", tmp_path / "k")
    with pytest.raises(IntegrityError):
        store.get_bytes("k")
    assert not (tmp_path / "k").exists()


def test_missing_bucket_names_bucket_and_endpoint(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = open_storage(
        "s3://no-such-bucket-here",
        endpoint=s3_bucket.endpoint,
        access_key=s3_bucket.access_key,
        secret_key=s3_bucket.secret_key,
    )
    expected = f"'no-such-bucket-here' does not exist at {s3_bucket.endpoint}"
    for call in (
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.stat("k"),
        lambda: store.put_bytes("k", b"1"),
        lambda: store.list_keys("p"),
    ):
        with pytest.raises(BucketNotFound, match=expected):
            call()


def test_missing_key_names_the_key(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = s3_bucket.open("pre")
    for call in (
        lambda: store.get_bytes("a/missing.bin"),
        lambda: store.stat("a/missing.bin"),
        lambda: store.get_file("a/missing.bin", tmp_path / "m"),
    ):
        with pytest.raises(ObjectNotFound, match="'a/missing.bin'") as e:
            call()
        assert not isinstance(e.value, BucketNotFound)
    src = make_tree(tmp_path / "src")
    store.upload_dir(src, "a")
    expected = {**hash_tree(src), "model/extra.bin": FileEntry(sha256="0" * 64, bytes=1)}
    with pytest.raises(ObjectNotFound, match="model/extra.bin"):
        store.download_dir("a", tmp_path / "d", expected=expected)


def test_missing_and_wrong_credentials(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    s3_bucket.open().put_bytes("k", b"1")
    anonymous = open_storage(s3_bucket.root_uri, endpoint=s3_bucket.endpoint)
    with pytest.raises(StorageError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        anonymous.get_bytes("k")
    caplog.set_level(logging.DEBUG, logger="meritrun")
    for access_key in (s3_bucket.access_key, "AKUNKNOWN"):
        wrong = open_storage(
            s3_bucket.root_uri,
            endpoint=s3_bucket.endpoint,
            access_key=access_key,
            secret_key="wrong-secret-123",
        )
        for op, args in (("get_bytes", ("k",)), ("exists", ("k",)), ("put_bytes", ("k2", b"1"))):
            with pytest.raises(StorageError, match="credentials refused.*AWS_SECRET") as e:
                getattr(wrong, op)(*args)
            assert not isinstance(e.value, (TransientError, ObjectNotFound))
            assert "wrong-secret-123" not in str(e.value)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("meritrun")]
    assert not [m for m in ours if "retry" in m]  # a 4xx is never retried
    assert "wrong-secret-123" not in caplog.text


def test_upload_resumes_after_interruption(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_bucket.open()
    src = make_tree(tmp_path / "src")
    real_put, calls = store._put, []

    def flaky_put(key: str, path: Path, sha256: str):  # type: ignore[no-untyped-def]
        calls.append(key)
        if len(calls) == 3:
            raise TransientError("connection dropped")
        return real_put(key, path, sha256)

    monkeypatch.setattr(store, "_put", flaky_put)
    with pytest.raises(TransientError):
        store.upload_dir(src, "p")
    monkeypatch.setattr(store, "_put", real_put)
    sent: list[int] = []
    store.upload_dir(src, "p", progress=sent.append)
    assert sent == [(src / "model" / "weights.bin").stat().st_size]  # only the missing file
    sent.clear()
    store.upload_dir(src, "p", progress=sent.append)
    assert sum(sent) == 0


def test_presigned_put_and_get_with_urllib(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.open("shared")
    put_url = store.presigned_put("drop/w.bin", timedelta(minutes=5))
    req = urllib.request.Request(put_url, data=b"payload", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert store.get_bytes("drop/w.bin") == b"payload"
    with urllib.request.urlopen(
        store.presigned_get("drop/w.bin", timedelta(minutes=5)), timeout=10
    ) as resp:
        assert resp.read() == b"payload"
    with pytest.raises(StorageError):
        store.presigned_get("drop/w.bin", timedelta(days=30))  # S3 allows at most 7 days


def test_identity_limited_to_reading_one_bucket(seaweed_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reader = Identity.random("reader", ["Read:shared", "List:shared"])
    server: SeaweedServer = seaweed_factory(identities=[reader])
    server.make_bucket("shared")
    server.make_bucket("private")
    server.client().put_object("shared", "w.bin", io.BytesIO(b"w"), 1)
    store = open_storage(
        "s3://shared",
        endpoint=server.endpoint,
        access_key=reader.access_key,
        secret_key=reader.secret_key,
    )
    assert store.get_bytes("w.bin") == b"w"
    assert store.list_keys("") == ["w.bin"]
    with pytest.raises(StorageError, match="not allowed.*AccessDenied"):
        store.put_bytes("x", b"1")
    other = open_storage(
        "s3://private",
        endpoint=server.endpoint,
        access_key=reader.access_key,
        secret_key=reader.secret_key,
    )
    with pytest.raises(StorageError, match="AccessDenied"):
        other.list_keys("")


def test_fetch_path_downloads_objects_and_prefixes(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_bucket.open()
    src = make_tree(tmp_path / "src")
    store.upload_dir(src, "models/base")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    cache = tmp_path / "cache"
    uri = f"s3://{s3_bucket.name}/models/base"
    local = fetch_path(uri, cache, endpoint=s3_bucket.endpoint)
    assert local == cache / s3_bucket.name / "models/base"
    assert hash_tree(local) == hash_tree(src)
    one = fetch_path(uri + "/manifest.json", cache / "one", endpoint=s3_bucket.endpoint)
    assert one.is_file() and one.read_text() == "{}"
    monkeypatch.setenv("MERITRUN_S3_ENDPOINT", s3_bucket.endpoint)
    with pytest.raises(ObjectNotFound, match="models/nothing"):
        fetch_path(f"s3://{s3_bucket.name}/models/nothing", cache)


# --- retries, against a closed port and a fake server ---------------------------------------


def test_unreachable_server_gives_transient_error_after_bounded_attempts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    store = S3Storage(
        "bkt",
        endpoint=f"http://127.0.0.1:{port}",
        access_key="a",
        secret_key="b",
        retry=RetryPolicy(attempts=3, base_delay_s=0.01),
    )
    start = time.monotonic()
    with pytest.raises(TransientError, match="cannot reach.*after 3 attempts"):
        store.get_bytes("k")
    assert time.monotonic() - start < 2.0


class FakeS3(BaseHTTPRequestHandler):
    """Answers the first `failures` requests with `status`/`code`, then 200 "ok"."""

    failures, status, code, seen = 0, 503, "SlowDown", 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            body = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>nope</Message><Resource>/b/k</Resource></Error>"
            ).encode()
            self.send_response(self.status)
            self.send_header("Content-Type", "application/xml")
        else:
            body = b"ok"
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_s3() -> Iterator[tuple[type[FakeS3], str]]:
    handler = type("Handler", (FakeS3,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads, server.block_on_close = True, False  # clients keep connections open
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_transient_server_errors_are_retried(fake_s3, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    handler, endpoint = fake_s3
    handler.failures, handler.status, handler.code = 2, status, code
    retry = RetryPolicy(attempts=3, base_delay_s=0.01)
    store = S3Storage(
        "bkt", endpoint=endpoint, region="us-east-1", access_key="a", secret_key="b", retry=retry
    )
    assert store.get_bytes("k") == b"ok"
    assert handler.seen == 3
    handler.seen, handler.failures = 0, 10
    with pytest.raises(TransientError, match=f"{code}.*after 3 attempts"):
        store.get_bytes("k")
    assert handler.seen == 3


def test_client_errors_are_not_retried(fake_s3) -> None:  # type: ignore[no-untyped-def]
    handler, endpoint = fake_s3
    handler.failures, handler.status, handler.code = 10, 400, "InvalidArgument"
    store = S3Storage(
        "bkt",
        endpoint=endpoint,
        region="us-east-1",
        access_key="a",
        secret_key="b",
        retry=RetryPolicy(attempts=5, base_delay_s=0.01),
    )
    with pytest.raises(StorageError, match="InvalidArgument") as e:
        store.get_bytes("k")
    assert not isinstance(e.value, TransientError)
    assert handler.seen == 1
