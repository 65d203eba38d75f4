"""The storage interface on a local directory, plus URI parsing and key rules (no server)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from meritrun.artifacts import FileEntry, hash_tree, sha256_file
from meritrun.errors import IntegrityError, ObjectNotFound, StorageError
from meritrun.storage import (
    LocalStorage,
    S3Storage,
    fetch_path,
    open_storage,
    split_uri,
    validate_key,
)
from meritrun.storage import local as local_module


def make_tree(root: Path) -> Path:
    (root / "model" / "sub").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "model" / "sub" / "config.json").write_text('{"a": 1}')
    (root / "manifest.json").write_text("{}")
    return root


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    storage = open_storage((tmp_path / "store").as_uri())
    assert isinstance(storage, LocalStorage)
    return storage


def test_core_storage_imports_neither_torch_nor_kopf() -> None:
    code = "import sys, meritrun.storage; print('torch' in sys.modules, 'kopf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_bytes_and_files_round_trip(store: LocalStorage, tmp_path: Path) -> None:
    info = store.put_bytes("a/b.txt", b"hello")
    assert (info.key, info.bytes) == ("a/b.txt", 5)
    assert store.get_bytes("a/b.txt") == b"hello"
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(10_000))
    info = store.put_file("a/c.bin", src)
    assert info.sha256 == sha256_file(src) == store.stat("a/c.bin").sha256
    out = store.get_file("a/c.bin", tmp_path / "out" / "c.bin", sha256=info.sha256, size=10_000)
    assert out.read_bytes() == src.read_bytes()
    assert store.exists("a/c.bin") and not store.exists("a/zzz")
    assert store.uri_for("a/c.bin") == store.root_uri + "/a/c.bin"


def test_list_and_delete_use_directory_semantics(store: LocalStorage) -> None:
    for key in ("a/b", "a/b/x", "a/b/y/z", "a/bc", "q"):
        store.put_bytes(key if key != "a/b" else "a/b2", b"1")
    assert store.list_keys("a/b") == ["a/b/x", "a/b/y/z"]
    assert store.list_keys("") == ["a/b/x", "a/b/y/z", "a/b2", "a/bc", "q"]
    assert store.list_keys("nothing/here") == []
    assert store.list_keys("q") == ["q"]
    assert store.delete_prefix("a/b") == 2
    assert store.list_keys("") == ["a/b2", "a/bc", "q"]
    assert not (store.root / "a" / "b").exists()


def test_missing_key_names_the_key(store: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="'runs/x/missing.bin'"):
        store.get_bytes("runs/x/missing.bin")
    with pytest.raises(ObjectNotFound, match="missing.bin"):
        store.get_file("runs/x/missing.bin", tmp_path / "o")


def test_directory_round_trip_with_expected_hashes(store: LocalStorage, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    uploaded = store.upload_dir(src, "runs/r1/attempt-1")
    assert sorted(uploaded) == ["manifest.json", "model/sub/config.json", "model/weights.bin"]
    expected = hash_tree(src)
    dest = store.download_dir("runs/r1/attempt-1", tmp_path / "dest", expected=expected)
    assert hash_tree(dest) == expected
    assert (dest / "manifest.json").read_text() == "{}"  # files outside `expected` come too


def test_missing_expected_file_is_named(store: LocalStorage, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store.upload_dir(src, "p")
    expected = {**hash_tree(src), "model/extra.bin": FileEntry(sha256="0" * 64, bytes=1)}
    with pytest.raises(ObjectNotFound, match="model/extra.bin"):
        store.download_dir("p", tmp_path / "dest", expected=expected)


def test_corrupted_object_is_detected_and_not_kept(store: LocalStorage, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store.upload_dir(src, "p")
    stored = store.root / "p" / "model" / "weights.bin"
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF  # same size, different bytes
    stored.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="model/weights.bin"):
        store.download_dir("p", dest, expected=hash_tree(src))
    assert not (dest / "model" / "weights.bin").exists()
    assert not [p for p in dest.rglob("*") if p.name.endswith(".meritrun-partial")]


def test_size_mismatch_deletes_the_bad_file(store: LocalStorage, tmp_path: Path) -> None:
    store.put_bytes("k", b"12345")
    with pytest.raises(IntegrityError, match="size 5 != expected 4"):
        store.get_file("k", tmp_path / "k", size=4)
    assert not (tmp_path / "k").exists()


def test_upload_resumes_without_resending(store: LocalStorage, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    sent: list[int] = []
    store.upload_dir(src, "p", progress=sent.append)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert sum(sent) == total
    sent.clear()
    store.upload_dir(src, "p", progress=sent.append)
    assert sent == []
    (src / "manifest.json").write_text('{"changed": true}')
    store.upload_dir(src, "p", progress=sent.append)
    assert sent == [len('{"changed": true}')]
    sent.clear()
    store.upload_dir(src, "p", progress=sent.append, skip_existing=False)
    assert sum(sent) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def test_crash_mid_write_leaves_no_file_under_final_name(
    store: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes("model/w.bin", b"old")
    src = tmp_path / "w.bin"
    src.write_bytes(b"new" * 1000)

    def crash(src_f: object, dst_f: object) -> tuple[str, int]:
        dst_f.write(b"ne")  # type: ignore[attr-defined]
        raise OSError("disk gone")

    monkeypatch.setattr(local_module, "copy_hashing", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put_file("model/w.bin", src)
    with pytest.raises(OSError, match="disk gone"):
        store.put_file("model/new.bin", src)
    assert store.get_bytes("model/w.bin") == b"old"
    assert store.list_keys("") == ["model/w.bin"]
    assert [p.name for p in (store.root / "model").iterdir()] == ["w.bin"]


@pytest.mark.parametrize(
    "key", ["../x", "a/../../b", "/etc/passwd", "", "a//b", "./a", "a/./b", "a\\..\\b"]
)
def test_bad_keys_are_refused(store: LocalStorage, key: str) -> None:
    with pytest.raises(StorageError, match="key"):
        store.put_bytes(key, b"x")
    s3 = S3Storage("bucket", "pre", endpoint="http://127.0.0.1:1", access_key="a", secret_key="b")
    with pytest.raises(StorageError, match="key"):
        s3.uri_for(key or "/")


def test_validate_key_normalizes_trailing_slash() -> None:
    assert validate_key("a/b/") == "a/b"
    assert validate_key("", allow_empty=True) == ""


def test_presigned_urls_need_s3(store: LocalStorage) -> None:
    with pytest.raises(StorageError, match="s3://"):
        store.presigned_get("k", timedelta(minutes=1))
    with pytest.raises(StorageError, match="s3://"):
        store.presigned_put("k", timedelta(minutes=1))


def test_split_uri() -> None:
    assert split_uri("s3://b/a/b/c") == ("s3://b", "a/b/c")
    assert split_uri("s3://b") == ("s3://b", "")
    assert split_uri("file:///x/y") == ("file:///x/y", "")
    assert split_uri("rel/dir") == ((Path.cwd() / "rel/dir").as_uri(), "")
    with pytest.raises(StorageError, match="'..'"):
        split_uri("s3://b/../c")


def test_open_storage_roots(tmp_path: Path) -> None:
    plain = open_storage(str(tmp_path / "x"))
    assert isinstance(plain, LocalStorage) and plain.root == tmp_path / "x"
    s3 = open_storage(
        "s3://bkt/some/prefix", endpoint="http://127.0.0.1:1", access_key="a", secret_key="b"
    )
    assert isinstance(s3, S3Storage)
    assert s3.root_uri == "s3://bkt/some/prefix"
    assert s3.uri_for("k/v") == "s3://bkt/some/prefix/k/v"
    assert s3.uri_for("") == s3.root_uri
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_storage("s3:///x")


def test_endpoint_and_credentials_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERITRUN_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    s3 = open_storage("s3://bkt")
    assert isinstance(s3, S3Storage)
    assert (s3.endpoint, s3.access_key) == ("http://minio:9000", "AKENV")
    assert "very-secret-value" not in repr(s3) + repr(vars(s3))


def test_incomplete_credentials_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as e:
        open_storage("s3://bkt", endpoint="http://127.0.0.1:1", secret_key="hush-hush")
    assert "hush-hush" not in str(e.value)
    with pytest.raises(StorageError, match="http"):
        open_storage("s3://bkt", endpoint="ftp://host/x")


def test_fetch_path_returns_local_paths_as_they_are(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m") / "model"
    assert fetch_path(str(model), tmp_path / "cache") == model
    assert fetch_path(model.as_uri(), tmp_path / "cache") == model
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ObjectNotFound, match="nope"):
        fetch_path(str(tmp_path / "nope"), tmp_path / "cache")
