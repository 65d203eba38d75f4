"""The storage interface every backend implements, and the parts they share.

Backends only move single objects (put/get/stat/list/delete). Directory transfer, resume and
integrity checks live here once, so a local directory and an S3 bucket behave the same. This
module does no I/O beyond local files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from meritrun.artifacts import FileEntry, sha256_file
from meritrun.errors import IntegrityError, ObjectNotFound, StorageError

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
PARTIAL_SUFFIX = ".meritrun-partial"  # temp files; never listed, never left under a final name
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    bytes: int
    sha256: str | None


@dataclass(frozen=True)
class ObjectVersion:
    """What ranged reads pin an object to: its size and a tag that changes with its bytes
    (the S3 ETag; a local file's size and mtime), so two passes read the same object."""

    key: str
    bytes: int
    tag: str | None


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Check a POSIX key relative to the root; return it without a trailing '/'."""
    if not isinstance(key, str):
        raise StorageError(f"storage key must be a string, got {type(key).__name__}")
    if key.startswith("/"):
        raise StorageError(f"storage key {key!r} must be relative (no leading '/')")
    stripped = key.rstrip("/")
    if not stripped:
        if allow_empty:
            return ""
        raise StorageError("storage key must not be empty")
    for part in stripped.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"storage key {key!r} has an empty, '.' or '..' segment")
        if "\\" in part or "\x00" in part:
            raise StorageError(f"storage key {key!r} contains a backslash or NUL")
    return stripped


def join_key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix and rel else prefix or rel


def under_prefix(key: str, prefix: str) -> bool:
    """Directory semantics: "a/b" holds "a/b" and "a/b/x", not "a/bc"."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def partial_file(dest: Path) -> tuple[BinaryIO, Path]:
    """An open temp file next to dest, so the final rename is atomic (same filesystem)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX)
    return os.fdopen(fd, "wb"), Path(tmp)


def commit_partial(
    tmp: Path, dest: Path, *, key: str, got: tuple[str, int], sha256: str | None, size: int | None
) -> Path:
    """Rename tmp to dest if it matches what was expected; otherwise delete it and raise."""
    digest, n = got
    problem = None
    if size is not None and n != size:
        problem = f"size {n} != expected {size}"
    elif sha256 is not None and digest != sha256:
        problem = f"sha256 {digest} != expected {sha256}"
    if problem:
        tmp.unlink(missing_ok=True)
        raise IntegrityError(f"object {key!r} is corrupt: {problem}; the local copy was deleted")
    os.replace(tmp, dest)
    return dest


class Storage(ABC):
    """Objects under one root: a local directory or an S3 bucket (optionally with a prefix)."""

    root_uri: str

    @abstractmethod
    def uri_for(self, key: str) -> str: ...

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and recorded sha256 (None when the object has none); ObjectNotFound if absent."""

    @abstractmethod
    def _put(self, key: str, path: Path, sha256: str) -> ObjectInfo: ...

    @abstractmethod
    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> Path: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def version(self, key: str) -> ObjectVersion:
        """Size and version tag, without reading the bytes; ObjectNotFound if absent."""

    @abstractmethod
    def read_into(self, key: str, offset: int, buf: memoryview, *, tag: str | None = None
                  ) -> None:
        """Fill `buf` with the object's bytes [offset, offset + len(buf)) (a ranged GET on S3,
        a pread locally). With `tag` (from `version`), an object that changed since is an
        IntegrityError; fewer bytes than asked (the object is shorter) are one too."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def presigned_get(self, key: str, expires: timedelta) -> str: ...

    @abstractmethod
    def presigned_put(self, key: str, expires: timedelta) -> str: ...

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        return self._put(validate_key(key), Path(path), sha256_file(Path(path)))

    def upload_dir(
        self,
        local_dir: Path,
        prefix: str,
        *,
        progress: Progress | None = None,
        skip_existing: bool = True,
    ) -> dict[str, ObjectInfo]:
        """Upload every file under local_dir; files already there (same size and sha256) are
        not sent again, which is how an interrupted upload resumes."""
        local_dir, prefix = Path(local_dir), validate_key(prefix, allow_empty=True)
        if not local_dir.is_dir():
            raise StorageError(f"cannot upload {local_dir}: not a directory")
        done: dict[str, ObjectInfo] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            key, digest, size = join_key(prefix, rel), sha256_file(path), path.stat().st_size
            if skip_existing:
                try:
                    have = self.stat(key)
                except ObjectNotFound:
                    have = None
                if have is not None and have.bytes == size and have.sha256 == digest:
                    done[rel] = have
                    continue
            done[rel] = self._put(key, path, digest)
            if progress is not None:
                progress(size)
        log.info("uploaded %d files to %s", len(done), self.uri_for(prefix))
        return done

    def download_dir(
        self,
        prefix: str,
        dest: Path,
        *,
        expected: Mapping[str, FileEntry] | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Download every object under prefix into dest; files named in `expected` must exist
        and match their sha256 and size (a local file that already matches is kept)."""
        prefix, dest = validate_key(prefix, allow_empty=True), Path(dest)
        cut = len(prefix) + 1 if prefix else 0
        rels = [k[cut:] for k in self.list_keys(prefix) if k != prefix]
        expected = dict(expected or {})
        missing = sorted(set(expected) - set(rels))
        if missing:
            raise ObjectNotFound(
                f"{self.uri_for(prefix)}: expected file(s) missing: {', '.join(missing)}"
            )
        for rel in rels:
            validate_key(rel)  # a hostile listing must not write outside dest
            entry, target = expected.get(rel), dest / rel
            if entry and target.is_file() and target.stat().st_size == entry.bytes:
                if sha256_file(target) == entry.sha256:
                    continue
            self.get_file(
                join_key(prefix, rel),
                target,
                sha256=entry.sha256 if entry else None,
                size=entry.bytes if entry else None,
            )
            if progress is not None:
                progress(target.stat().st_size)
        dest.mkdir(parents=True, exist_ok=True)
        return dest
