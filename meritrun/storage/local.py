"""Storage in a local directory: the embedded default (`meritrun run --local`) and tests.

Every write goes to a temp file in the target directory and is renamed into place, so a crash
never leaves a half-written file under its final name. There is no metadata store: the sha256
of an object is computed from its bytes when asked. No presigned URLs (nothing serves them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path

from meritrun.artifacts import sha256_file
from meritrun.errors import IntegrityError, ObjectNotFound, StorageError
from meritrun.storage.base import (
    PARTIAL_SUFFIX,
    ObjectInfo,
    ObjectVersion,
    Storage,
    commit_partial,
    copy_hashing,
    partial_file,
    under_prefix,
    validate_key,
)

log = logging.getLogger(__name__)


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.root_uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStorage({self.root_uri!r})"

    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        key = validate_key(key, allow_empty=allow_empty)
        return self.root / key if key else self.root

    def uri_for(self, key: str) -> str:
        return self._path(key, allow_empty=True).as_uri()

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.root_uri}")
        return path

    def stat(self, key: str) -> ObjectInfo:
        path = self._existing(key)
        return ObjectInfo(validate_key(key), path.stat().st_size, sha256_file(path))

    def _write(self, key: str, src: Path | bytes) -> ObjectInfo:
        dest = self._path(key)
        if dest.is_dir():
            raise StorageError(f"cannot write object {key!r}: {dest} is a directory")
        out, tmp = partial_file(dest)
        try:
            with out:
                if isinstance(src, bytes):
                    out.write(src)
                    digest, size = hashlib.sha256(src).hexdigest(), len(src)
                else:
                    with src.open("rb") as f:
                        digest, size = copy_hashing(f, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(validate_key(key), size, digest)

    def _put(self, key: str, path: Path, sha256: str) -> ObjectInfo:
        info = self._write(key, path)
        if info.sha256 != sha256:  # the source changed while we copied it
            raise StorageError(f"{path} changed during upload to {self.uri_for(key)}")
        return info

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._write(key, bytes(data))

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def get_file(
        self, key: str, dest: Path, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        src, dest = self._existing(key), Path(dest)
        out, tmp = partial_file(dest)
        try:
            with out, src.open("rb") as f:
                got = copy_hashing(f, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return commit_partial(tmp, dest, key=key, got=got, sha256=sha256, size=size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def version(self, key: str) -> ObjectVersion:
        st = self._existing(key).stat()
        return ObjectVersion(validate_key(key), st.st_size, _tag(st))

    def read_into(self, key: str, offset: int, buf: memoryview, *, tag: str | None = None
                  ) -> None:
        """pread from the file; a symlink is refused (O_NOFOLLOW), as an artifact's files are
        read as files, never followed."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise ObjectNotFound(f"no object {key!r} in {self.root_uri}") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.uri_for(key)}: {e.strerror}") from e
        try:
            if tag is not None and _tag(os.fstat(fd)) != tag:
                raise IntegrityError(f"{self.uri_for(key)} changed since it was first read")
            done = 0
            while done < len(buf) and (got := os.preadv(fd, [buf[done:]], offset + done)):
                done += got
        finally:
            os.close(fd)
        if done != len(buf):
            raise IntegrityError(f"{self.uri_for(key)}: {done} of the {len(buf)} bytes at "
                                 f"offset {offset} (the file is shorter)")

    def list_keys(self, prefix: str) -> list[str]:
        prefix = validate_key(prefix, allow_empty=True)
        base = self._path(prefix, allow_empty=True)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not k.endswith(PARTIAL_SUFFIX) and under_prefix(k, prefix))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        base = self._path(prefix, allow_empty=True)
        if base.is_dir() and base != self.root and not any(p.is_file() for p in base.rglob("*")):
            shutil.rmtree(base, ignore_errors=True)
        log.debug("deleted %d objects under %s", len(keys), self.uri_for(prefix))
        return len(keys)

    def presigned_get(self, key: str, expires: timedelta) -> str:
        raise StorageError(f"presigned URLs need an s3:// root; {self.root_uri} is a local folder")

    def presigned_put(self, key: str, expires: timedelta) -> str:
        raise StorageError(f"presigned URLs need an s3:// root; {self.root_uri} is a local folder")


def _tag(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}"
