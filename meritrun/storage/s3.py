"""Storage on an S3-compatible server (MinIO in production, SeaweedFS in tests, AWS S3).

Built on the `minio` client with its own urllib3 retries turned off: this module owns the
retry policy (bounded attempts within a bounded total time, exponential backoff with jitter,
only for transient failures; a 4xx is never retried; urllib3's socket timeouts from the same
policy, so a hung server gives up in seconds) and turns every client error into a MeritRun
error that says what to fix. Each object carries its sha256 as user metadata
(`x-amz-meta-sha256`), which downloads verify and resumed uploads compare. Secrets never
appear in messages, reprs or logs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from meritrun.errors import IntegrityError, ObjectNotFound, StorageError, TransientError
from meritrun.storage.base import (
    ObjectInfo,
    ObjectVersion,
    Storage,
    commit_partial,
    copy_hashing,
    join_key,
    partial_file,
    under_prefix,
    validate_key,
)
from meritrun.storage.policies import MultipartPolicy, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
CREDENTIAL_ENV = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
_META_SHA256 = "x-amz-meta-sha256"
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
_CREDENTIAL_CODES = set(
    "AccessDenied InvalidAccessKeyId SignatureDoesNotMatch InvalidToken ExpiredToken".split()
)
_CLIENT_ERRORS = (
    MinioException,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
    ValueError,
)  # ValueError: minio's argument checks (bucket name, expiry)
_MISSING_KEY_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}
# a ranged read of an object that changed (If-Match failed) or is shorter than its header says
_CHANGED_CODES = {"PreconditionFailed", "InvalidRange"}


class BucketNotFound(ObjectNotFound):
    """The bucket itself is missing (a configuration error, unlike a missing key)."""


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        retry: RetryPolicy | None = None,
        multipart: MultipartPolicy | None = None,
    ) -> None:
        self.bucket, self.prefix = bucket, validate_key(prefix, allow_empty=True)
        self.root_uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint = endpoint or os.environ.get("MERITRUN_S3_ENDPOINT") or DEFAULT_ENDPOINT
        self.retry, self.multipart = retry or RetryPolicy(), multipart or MultipartPolicy()
        access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID") or None
        secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access_key) != bool(secret_key):
            given = "access key" if access_key else "secret key"
            raise StorageError(
                f"S3 credentials for {self.endpoint} are incomplete: only the {given} is set; "
                f"set both {CREDENTIAL_ENV} (or pass access_key and secret_key)"
            )
        self.access_key = access_key
        url = urlsplit(self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}")
        if url.scheme not in ("http", "https") or url.path not in ("", "/") or not url.netloc:
            raise StorageError(f"S3 endpoint {self.endpoint!r} must look like http(s)://host:port")
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.retry.connect_timeout_s,
                                    read=self.retry.read_timeout_s),
            retries=False,  # retried here, with our policy and our error messages
            maxsize=10,
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self.client = Minio(
            url.netloc,
            access_key,
            secret_key,
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
            secure=url.scheme == "https",
            region=region or os.environ.get("AWS_REGION") or None,
            http_client=http,
        )
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3Storage({self.root_uri!r}, endpoint={self.endpoint!r})"

    # --- errors and retries ----------------------------------------------------------------

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                result = fn()
                self._bucket_seen = self._bucket_seen or what != "presign"
                return result
            except _CLIENT_ERRORS as e:
                err = self._translate(e, what, key)
                if not isinstance(err, TransientError):
                    raise err from e
                delay = self.retry.delay_s(attempt)
                spent = time.monotonic() - start
                if attempt == self.retry.attempts or spent + delay > self.retry.deadline_s:
                    raise TransientError(f"{err} (gave up after {attempt} attempts in "
                                         f"{spent:.1f} s)") from e
                log.warning("%s; retry %d/%d in %.2f s", err, attempt, self.retry.attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _translate(self, e: Exception, what: str, key: str) -> Exception:
        where = f"{what} {self.uri_for(key)} at {self.endpoint}"
        if isinstance(e, urllib3.exceptions.SSLError):
            return StorageError(f"{where}: TLS failed: {e}")
        if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return TransientError(f"{where}: cannot reach the server: {type(e).__name__}: {e}")
        if isinstance(e, ValueError):
            return StorageError(f"{where}: {e}")
        status = _status_of(e)
        code = e.code if isinstance(e, S3Error) else None
        if code == "NoSuchBucket" or (code in _MISSING_KEY_CODES and self._bucket_missing()):
            return BucketNotFound(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
        if code in _MISSING_KEY_CODES:
            return ObjectNotFound(f"no object {key!r} in {self.root_uri} (at {self.endpoint})")
        if code in _CHANGED_CODES or status in (412, 416):
            return IntegrityError(f"{where}: the object changed since it was first read, or is "
                                  f"shorter than expected ({code or status})")
        if code in _CREDENTIAL_CODES:
            if not self.access_key:
                return StorageError(
                    f"{where}: no S3 credentials were given and anonymous access was refused "
                    f"({code}); set {CREDENTIAL_ENV}"
                )
            return StorageError(
                f"{where}: credentials refused or not allowed ({code}) for access key "
                f"{self.access_key!r}; check {CREDENTIAL_ENV} and that key's permissions"
            )
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(f"{where}: server error {code or status}")
        detail = f"{code}: {e.message}" if isinstance(e, S3Error) else str(e)
        return StorageError(f"{where}: {detail[:500]}")  # a proxy's error page can be long

    def _bucket_missing(self) -> bool:
        """A HEAD on a key of a missing bucket says 404 NoSuchKey; ask about the bucket once."""
        if self._bucket_seen:
            return False
        try:
            self._bucket_seen = self.client.bucket_exists(self.bucket)
        except Exception:  # noqa: BLE001 - only refines a message
            return False
        return not self._bucket_seen

    # --- objects ---------------------------------------------------------------------------

    def _name(self, key: str, *, allow_empty: bool = False) -> str:
        return join_key(self.prefix, validate_key(key, allow_empty=allow_empty))

    def uri_for(self, key: str) -> str:
        name = self._name(key, allow_empty=True)
        return f"s3://{self.bucket}/{name}" if name else f"s3://{self.bucket}"

    def stat(self, key: str) -> ObjectInfo:
        obj = self._call("stat", key, lambda: self.client.stat_object(self.bucket, self._name(key)))
        return ObjectInfo(validate_key(key), obj.size or 0, (obj.metadata or {}).get(_META_SHA256))

    def _put(self, key: str, path: Path, sha256: str) -> ObjectInfo:
        size = path.stat().st_size
        self._call(
            "upload",
            key,
            lambda: self.client.fput_object(
                self.bucket,
                self._name(key),
                str(path),
                metadata={"sha256": sha256},
                part_size=self.multipart.part_size_for(size),
                num_parallel_uploads=self.multipart.parallel,
            ),
        )
        return ObjectInfo(validate_key(key), size, sha256)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        self._call(
            "upload",
            key,
            lambda: self.client.put_object(
                self.bucket,
                self._name(key),
                io.BytesIO(data),
                len(data),
                metadata={"sha256": digest},
            ),
        )
        return ObjectInfo(validate_key(key), len(data), digest)

    def get_bytes(self, key: str) -> bytes:
        def fetch() -> tuple[bytes, str | None]:
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                return resp.read(), resp.headers.get(_META_SHA256)
            finally:
                resp.close()
                resp.release_conn()

        data, recorded = self._call("download", key, fetch)
        if recorded and hashlib.sha256(data).hexdigest() != recorded:
            raise IntegrityError(f"object {key!r} in {self.root_uri} does not match its sha256")
        return data

    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        dest = Path(dest)

        def fetch() -> tuple[Path, tuple[str, int], str | None]:
            resp = self.client.get_object(self.bucket, self._name(key))
            out, tmp = partial_file(dest)
            try:
                with out:
                    got = copy_hashing(resp, out)  # type: ignore[arg-type]
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                resp.close()
                resp.release_conn()
            return tmp, got, resp.headers.get(_META_SHA256)

        tmp, got, recorded = self._call("download", key, fetch)
        return commit_partial(tmp, dest, key=key, got=got, sha256=sha256 or recorded, size=size)

    def version(self, key: str) -> ObjectVersion:
        obj = self._call("stat", key, lambda: self.client.stat_object(self.bucket, self._name(key)))
        return ObjectVersion(validate_key(key), obj.size or 0, obj.etag)

    def read_into(self, key: str, offset: int, buf: memoryview, *, tag: str | None = None
                  ) -> None:
        size = len(buf)
        if size == 0:
            return
        headers = {"If-Match": f'"{tag.strip(chr(34))}"'} if tag else None

        def fetch() -> int:
            resp = self.client.get_object(self.bucket, self._name(key), offset=offset,
                                          length=size, request_headers=headers)
            done = 0
            try:
                while done < size and (got := resp.readinto(buf[done:])):  # type: ignore[attr-defined]
                    done += got
            finally:
                resp.close()
                resp.release_conn()
            return done

        done = self._call("download", key, fetch)
        if done != size:
            raise IntegrityError(f"object {key!r} in {self.root_uri}: {done} of the {size} bytes "
                                 f"at offset {offset} (the object is shorter)")

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except BucketNotFound:
            raise
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        prefix = validate_key(prefix, allow_empty=True)
        full = self._name(prefix, allow_empty=True)

        def names() -> list[str]:
            found = self.client.list_objects(self.bucket, prefix=full or None, recursive=True)
            return [o.object_name for o in found if o.object_name and not o.is_dir]

        cut = len(self.prefix) + 1 if self.prefix else 0  # S3 prefixes are plain string prefixes
        found = [n[cut:] for n in self._call("list", prefix, names) if under_prefix(n, full)]
        return sorted(k for k in found if k)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        if keys:
            doomed = [DeleteObject(self._name(k)) for k in keys]
            errors = self._call(
                "delete", prefix, lambda: list(self.client.remove_objects(self.bucket, doomed))
            )
            if errors:
                raise StorageError(f"delete under {self.uri_for(prefix)} failed: {errors[0]}")
        return len(keys)

    def presigned_get(self, key: str, expires: timedelta) -> str:
        return self._call(
            "presign",
            key,
            lambda: self.client.presigned_get_object(self.bucket, self._name(key), expires=expires),
        )

    def presigned_put(self, key: str, expires: timedelta) -> str:
        return self._call(
            "presign",
            key,
            lambda: self.client.presigned_put_object(self.bucket, self._name(key), expires=expires),
        )


def _status_of(e: Exception) -> int:
    if isinstance(e, S3Error) and e.response is not None:
        return int(e.response.status)
    if isinstance(e, ServerError):
        return e.status_code
    if isinstance(e, InvalidResponseError):
        return int(getattr(e, "_code", 0) or 0)
    return 0
