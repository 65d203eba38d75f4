"""The safetensors header of a file, read and checked: what each tensor is and where it lies.

A header (8-byte length + JSON) describes every tensor's dtype, shape and byte range; a merge
reads names, shapes and dtypes from it without reading a tensor, and a header that does not
describe its file (a lying or corrupt contribution) is a HeaderError naming the check. Dtypes
are `dtypes.Dtype` (no torch). Reading tensors is `io`'s; this module reads only headers.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from meritrun.errors import StorageError

from .dtypes import DTYPES, Dtype
from .remote import RemoteFile, remote_file

MAX_HEADER = 100 << 20  # bytes: no real header comes near it


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lies in a safetensors file, and what it is."""

    name: str
    dtype: Dtype  # torch-free (see `dtypes`); .torch for the torch pass
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


class HeaderError(StorageError):
    """A safetensors header that does not describe its file: the check that failed and where.

    Verification turns it into the refusal of the contribution holding the file (check
    `safetensors-header`), so a lying header can never abort a merge of the others.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{Path(path).name}: {problem}")
        self.path, self.problem = Path(path), problem


def open_regular(path: Path) -> int:
    """A read-only fd of `path`, refusing a symlink (O_NOFOLLOW) or anything not a regular
    file (a device, a FIFO, a directory): an artifact's files are read as files, never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if os.path.islink(path):
            raise StorageError(f"{path}: is a symbolic link") from e
        raise StorageError(f"{path}: cannot open: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"{path}: not a regular file")
    return fd


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < size:
        got = os.pread(fd, size - done, offset + done)
        if not got:
            break
        chunks.append(got)
        done += len(got)
    return b"".join(chunks)


def parse_header(raw: bytes, file_size: int, path: Path) -> tuple[dict[str, TensorMeta], dict]:
    """Validate and parse a safetensors header (`raw` = the JSON bytes after the 8-byte length).

    Checks, each a HeaderError naming it: a JSON object of objects; `__metadata__` a map of
    strings; every entry has exactly dtype (a known one), shape (non-negative ints) and
    data_offsets [begin, end] with end - begin = numel * itemsize; the entries tile the data
    area exactly (sorted, no gap, no overlap, ending at the file's end), as the reference
    implementation requires. Tensor metadata comes back in file order.
    """
    try:
        header = json.loads(raw, object_pairs_hook=_unique_object)
    except (ValueError, RecursionError) as e:
        raise HeaderError(path, f"header is not valid JSON ({str(e)[:80]})") from e
    if not isinstance(header, dict):
        raise HeaderError(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HeaderError(path, "__metadata__ is not a map of strings")
    start = 8 + len(raw)
    data_size = file_size - start
    entries = []
    for name, entry in header.items():
        entries.append((name, *_entry(path, name, entry)))
    entries.sort(key=lambda e: (e[3], e[4]))
    metas, cursor = {}, 0
    for name, dtype, shape, begin, end in entries:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise HeaderError(path, f"tensor {name}: data_offsets {begin} {what} (at {cursor})")
        if end > data_size:
            raise HeaderError(path, f"tensor {name}: data_offsets end {end} is past the data "
                                    f"area ({data_size} bytes)")
        metas[name] = TensorMeta(name, dtype, shape, Path(path), start + begin, end - begin)
        cursor = end
    if cursor != data_size:
        raise HeaderError(path, f"the tensors cover {cursor} of the {data_size} data bytes")
    return metas, metadata


def _entry(path: Path, name: str, entry: object) -> tuple[Dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise HeaderError(path, f"tensor {name}: entry must have exactly dtype, shape and "
                                f"data_offsets, has {keys}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(path, f"tensor {name}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
        raise HeaderError(path, f"tensor {name}: shape {shape!r} is not a list of ints >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_nonneg_int(o) for o in offsets) or offsets[0] > offsets[1]):
        raise HeaderError(path, f"tensor {name}: data_offsets {offsets!r} is not [begin, end] "
                                "with 0 <= begin <= end")
    begin, end = offsets
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != want:
        raise HeaderError(path, f"tensor {name}: {end - begin} data bytes for {dtype} "
                                f"{tuple(shape)}, which needs {want}")
    return DTYPES[dtype], tuple(shape), begin, end


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Tensor metadata (in file order) and the `__metadata__` strings of a safetensors file,
    validated against the file's size (see parse_header); a bad header is a HeaderError.
    A mounted file (see `remote`) is read with two small ranged GETs."""
    remote = remote_file(path)
    if remote is not None:  # parsed once per object version: each pass asks again
        if (path, remote) not in _REMOTE_HEADERS:
            _REMOTE_HEADERS[path, remote] = _parse_sized(
                lambda n, at: _read_remote(remote, n, at), remote.size, Path(path))
        return _REMOTE_HEADERS[path, remote]
    fd = open_regular(Path(path))
    try:
        return _parse_sized(lambda n, at: _read_exact(fd, n, at), os.fstat(fd).st_size,
                            Path(path))
    finally:
        os.close(fd)


_REMOTE_HEADERS: dict[tuple[Path, RemoteFile], tuple[dict[str, TensorMeta], dict]] = {}


def _read_remote(remote: RemoteFile, size: int, offset: int) -> bytes:
    buf = bytearray(max(0, min(size, remote.size - offset)))
    remote.read_into(offset, memoryview(buf))
    return bytes(buf)


def _parse_sized(read, file_size: int, path: Path) -> tuple[dict[str, TensorMeta], dict]:
    raw = read(8, 0)
    if len(raw) != 8:
        raise HeaderError(path, "not a safetensors file (shorter than 8 bytes)")
    (size,) = struct.unpack("<Q", raw)
    if size > min(MAX_HEADER, file_size - 8):
        raise HeaderError(path, f"header length {size} is implausible for a file of "
                                f"{file_size} bytes")
    return parse_header(read(size, 8), file_size, path)
