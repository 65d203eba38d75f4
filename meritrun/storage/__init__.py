"""One storage interface over a local directory and S3-compatible servers.

Every stage reads its inputs and writes its artifacts through `Storage`, so the same code runs
against a local folder (`file://` or a plain path: the embedded default) and against MinIO or
any S3 server (`s3://bucket/prefix`). Keys are POSIX paths relative to the root. This package
knows nothing about artifact layout (see `meritrun.artifacts`) and never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from meritrun.errors import ObjectNotFound, StorageError
from meritrun.storage.base import ObjectInfo, ObjectVersion, Progress, Storage, validate_key
from meritrun.storage.local import LocalStorage
from meritrun.storage.policies import MultipartPolicy, RetryPolicy
from meritrun.storage.s3 import BucketNotFound, S3Storage

__all__ = [
    "BucketNotFound",
    "LocalStorage",
    "MultipartPolicy",
    "ObjectInfo",
    "ObjectVersion",
    "Progress",
    "RetryPolicy",
    "S3Storage",
    "Storage",
    "fetch_path",
    "open_storage",
    "split_uri",
    "validate_key",
]


def _parse_s3(uri: str) -> tuple[str, str]:
    url = urlsplit(uri)
    if not url.netloc:
        raise StorageError(f"{uri!r}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
    return url.netloc, validate_key(unquote(url.path).lstrip("/"), allow_empty=True)


def _local_root(uri: str) -> Path:
    url = urlsplit(uri)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise StorageError(f"{uri!r}: file:// URIs must name a local path (file:///path)")
        return Path(unquote(url.path))
    if url.scheme and len(url.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise StorageError(f"{uri!r}: unsupported storage scheme; use s3://, file:// or a path")
    return Path(uri)


def split_uri(uri: str) -> tuple[str, str]:
    """Split a URI into (root, key): an s3 root is its bucket; a local root is the path itself.

    "s3://b/a/b/c" -> ("s3://b", "a/b/c"); "file:///x/y" -> ("file:///x/y", "");
    "x/y" -> ("file:///<cwd>/x/y", "").
    """
    if uri.startswith("s3://"):
        bucket, key = _parse_s3(uri)
        return f"s3://{bucket}", key
    return _local_root(uri).absolute().as_uri(), ""


def open_storage(
    root_uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    retry: RetryPolicy | None = None,
    multipart: MultipartPolicy | None = None,
) -> Storage:
    """Storage rooted at root_uri (s3://bucket[/prefix], file:///path or a plain path).

    For S3, endpoint defaults to $MERITRUN_S3_ENDPOINT (else AWS), the keys to
    $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY, the region to $AWS_REGION (else asked).
    """
    if root_uri.startswith("s3://"):
        bucket, prefix = _parse_s3(root_uri)
        return S3Storage(
            bucket,
            prefix,
            endpoint=endpoint,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            retry=retry,
            multipart=multipart,
        )
    return LocalStorage(_local_root(root_uri))


def fetch_path(
    uri: str, cache_dir: Path, *, endpoint: str | None = None, region: str | None = None
) -> Path:
    """A local path holding what uri names: local paths as they are (no copy); an s3 object
    downloaded to cache_dir/<bucket>/<key>, or, if no object has that key, every object under
    it as a directory there."""
    root, key = split_uri(uri)
    if not root.startswith("s3://"):
        path = _local_root(uri)
        if not path.exists():
            raise ObjectNotFound(f"{uri}: no such file or directory")
        return path
    storage = open_storage(root, endpoint=endpoint, region=region)
    dest = Path(cache_dir) / root.removeprefix("s3://") / key
    if key and storage.exists(key):
        return storage.get_file(key, dest)
    if not storage.list_keys(key):
        raise ObjectNotFound(f"nothing at {uri} (neither an object nor a prefix with objects)")
    return storage.download_dir(key, dest)
