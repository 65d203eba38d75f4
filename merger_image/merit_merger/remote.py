"""Weight files read where they lie in storage (ranged GETs), under the paths readers know.

A merge of K experts staged on local disk needs K x the model size of scratch space (1.4 TB
for 70B with four fp32 experts) and reads every byte once more to download it. Instead the
stages download only an artifact's small files (manifest, configs, tokenizer) and *mount* its
weight files: a mount maps the local path a file would have (`<dir>/model.safetensors`) to a
`RemoteFile`, and `io` reads any mounted path with `Storage.read_into` (a ranged GET on S3, a
pread on a file:// root) instead of from disk. Everything above `io` (headers, LoRA, second
moments, the checks, the engine) keeps working on paths and never learns where bytes come from.

The mount table is process-wide because readers are built deep inside other modules from
paths alone; `mounted` scopes it to one stage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 16 << 20  # bytes per ranged GET of a sequential pass: few requests, bounded memory


@dataclass(frozen=True)
class RemoteFile:
    """One object, pinned to the version first seen (its size and tag): a later read of a
    changed object is an IntegrityError, so every pass reads the bytes the first one hashed."""

    storage: Any  # meritrun.storage.Storage (not imported: this module stays light)
    key: str
    size: int
    tag: str | None = None

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.storage.read_into(self.key, offset, buf, tag=self.tag)

    @property
    def uri(self) -> str:
        return self.storage.uri_for(self.key)


_MOUNTS: dict[Path, RemoteFile] = {}


def _key(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


@contextmanager
def mounted(files: Mapping[Path, RemoteFile]) -> Iterator[None]:
    """Within the block, reading any of these paths reads its object instead."""
    keys = {_key(p): f for p, f in files.items()}
    clash = sorted(str(k) for k in keys if k in _MOUNTS)
    if clash:
        raise ValueError(f"already mounted: {clash[:3]}")
    _MOUNTS.update(keys)
    try:
        yield
    finally:
        for k in keys:
            _MOUNTS.pop(k, None)


def remote_file(path: Path | str) -> RemoteFile | None:
    """The object mounted at `path`, or None for an ordinary local file."""
    return _MOUNTS.get(_key(path)) if _MOUNTS else None


def mounted_in(directory: Path | str) -> list[Path]:
    """Mounted paths directly inside `directory` (what a glob of the dir would also find)."""
    d = _key(directory)
    return sorted(p for p in _MOUNTS if p.parent == d)


def is_file(path: Path | str) -> bool:
    """A regular local file, or a mounted object."""
    return remote_file(path) is not None or os.path.isfile(path)


class SequentialReader:
    """One pass over a file from its first byte to its last, hashing every byte read.

    `take(n)` hands out the next n bytes (n <= chunk) as a view valid until the next call.
    A reader thread fetches `chunk`-sized pieces (ranged GETs for a mounted file, preads
    otherwise) one ahead and hashes them, so the network, the hash and the caller's checks
    overlap; a file costs size / chunk requests, about 3 x chunk bytes of memory, and is
    read exactly once.
    """

    def __init__(self, path: Path, *, chunk: int = _CHUNK) -> None:
        self.path, self.chunk = Path(path), chunk
        self.remote = remote_file(path)
        self._fd = None if self.remote is not None else os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self.size = self.remote.size if self.remote is not None else os.fstat(self._fd).st_size
        self.sha256 = hashlib.sha256()
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._lo = self._hi = 0  # unconsumed bytes are _buf[_lo:_hi]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-read")
        self._fetched = 0  # file offset up to which chunks were asked for
        self._next: Future | None = self._ask()
        self._cur, self._at = b"", 0  # the chunk being consumed, and where

    def _ask(self) -> Future | None:
        if self._fetched >= self.size:
            return None
        pos, n = self._fetched, min(self.chunk, self.size - self._fetched)
        self._fetched += n
        return self._pool.submit(self._fetch, pos, n)

    def _fetch(self, pos: int, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        if self.remote is not None:
            self.remote.read_into(pos, view)
        else:
            done = 0
            while done < n and (got := os.preadv(self._fd, [view[done:]], pos + done)):
                done += got
            if done < n:
                raise EOFError(f"{self.path.name}: ends at byte {pos + done}, not {self.size}")
        self.sha256.update(buf)  # in order: one worker, chunks asked for in order
        return buf

    def take(self, n: int) -> memoryview:
        if n > self.chunk:
            raise ValueError(f"take({n}) is larger than the chunk ({self.chunk})")
        if self._hi - self._lo < n:
            self._refill()
            if self._hi - self._lo < n:
                raise EOFError(f"{self.path.name}: ends before {n} more bytes")
        view = self._view[self._lo:self._lo + n]
        self._lo += n
        return view

    def _refill(self) -> None:
        left = self._hi - self._lo
        self._buf[:left] = self._buf[self._lo:self._hi]
        self._lo, self._hi = 0, left
        while self._hi < self.chunk:
            if self._at == len(self._cur):
                if self._next is None:
                    return
                self._cur, self._at = self._next.result(), 0
                self._next = self._ask()
            n = min(self.chunk - self._hi, len(self._cur) - self._at)
            self._buf[self._hi:self._hi + n] = self._cur[self._at:self._at + n]
            self._hi, self._at = self._hi + n, self._at + n

    def drain(self) -> str:
        """Read (and hash) whatever is left; the file's sha256."""
        while self._next is not None:
            self._next.result()
            self._next = self._ask()
        return self.sha256.hexdigest()

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SequentialReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
