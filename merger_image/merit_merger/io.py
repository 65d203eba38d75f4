"""Tensor I/O for the merge engine: lazy per-tensor reads and streaming sharded writes.

Why not `safe_open`: it memory-maps the file, and every page a merge touches stays in the
process's resident set until the handle closes, so the RSS of a merge grew with the model
(measured: 1.1 GB RssFile after reading a 1 GB file). Here a tensor, or a block of its rows,
is read with `pread` into a fresh buffer that is freed after use; the safetensors header
(8-byte length + JSON) is parsed directly, so names, shapes and dtypes cost no tensor reads.

Writing is in `writer`. This module does no math and knows no merge method.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import stat
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meritrun.errors import StorageError

from .dtypes import DTYPES, Dtype
from .remote import RemoteFile, mounted_in, remote_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_MAX_HEADER = 100 << 20
Rows = tuple[int, int] | None  # rows [start, stop) of dim 0, or None: the whole tensor
Item = tuple[str, Rows]  # a block: a tensor's name and rows


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


def block_rows(meta: TensorMeta, chunk_elements: int, *, elementwise: bool) -> list[Rows]:
    """Row ranges covering a tensor, each at most chunk_elements (one row at least)."""
    if not elementwise or not meta.shape or meta.numel <= chunk_elements:
        return [None]
    per = max(1, chunk_elements // max(1, meta.numel // meta.rows))
    return [(a, min(a + per, meta.rows)) for a in range(0, meta.rows, per)]


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


def pread_into(fd: int, view: memoryview, offset: int, *, path: Path, name: str) -> None:
    """Fill `view` from `fd` at `offset`; a file that ends first is a StorageError naming
    the file and the tensor being read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise StorageError(f"{path}: truncated while reading {name}")
        done += got


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
    if size > min(_MAX_HEADER, file_size - 8):
        raise HeaderError(path, f"header length {size} is implausible for a file of "
                                f"{file_size} bytes")
    return parse_header(read(size, 8), file_size, path)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model dir: the index's shards, else every *.safetensors."""
    index = model_dir / INDEX_NAME
    if os.path.lexists(index):
        fd = open_regular(index)
        with os.fdopen(fd, "rb") as f:
            try:
                weight_map = json.loads(f.read(_MAX_HEADER))["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise StorageError(f"{INDEX_NAME}: not a weight index ({e})") from e
        bad = [n for n in names if not isinstance(n, str) or "/" in n or n in ("", ".", "..")
               or not n.endswith(".safetensors")]
        if bad:  # shards sit beside the index: a path would reach outside the model dir
            raise StorageError(f"{INDEX_NAME}: shard name(s) {bad[:3]} are not file names")
        return [model_dir / f for f in names]
    return sorted({*model_dir.glob("*.safetensors"),
                   *(p for p in mounted_in(model_dir) if p.name.endswith(".safetensors"))})


class ModelReader:
    """Lazy reader of the tensors of an HF model dir (one file or sharded, with the index)."""

    def __init__(self, model_dir: Path, files: Sequence[Path] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.files = list(files) if files is not None else weight_files(self.model_dir)
        if not self.files:
            raise StorageError(f"{self.model_dir}: no *.safetensors weights")
        self._metas: dict[str, TensorMeta] = {}
        for path in self.files:
            metas, _ = read_header(path)
            for name, meta in metas.items():
                if name in self._metas:
                    raise StorageError(f"{self.model_dir}: tensor {name} is in two files")
                self._metas[name] = meta
        self._fds: dict[Path, int] = {}
        self._opening = threading.Lock()  # `valuescan` reads on several threads
        self.bytes_read = 0

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def read(self, name: str, rows: tuple[int, int] | None = None, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor, or rows [start, stop) of dim 0, as stored; read into `out` (a
        uint8 buffer at least that large, reused by the caller) or into a fresh buffer."""
        import torch  # the torch pass's reads (see `dtypes`)

        meta = self._metas[name]
        start, stop = rows if rows is not None else (0, meta.rows)
        shape = ((stop - start, *meta.shape[1:]) if meta.shape else ())
        nbytes = (stop - start) * meta.row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        self._pread(meta, meta.offset + start * meta.row_bytes, buf.numpy())
        return buf.view(meta.dtype.torch).reshape(shape)

    def read_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The stored bytes of tensor `name` (or rows [start, stop) of dim 0) as a fresh
        uint8 array: `read` without torch (see `dtypes.to_float32`)."""
        meta = self._metas[name]
        start, stop = rows if rows is not None else (0, meta.rows)
        buf = np.empty((stop - start) * meta.row_bytes, np.uint8)
        self._pread(meta, meta.offset + start * meta.row_bytes, buf)
        return buf

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Zero-copy `read`: the tensor or its rows as stored, a view of a private mapping of
        just those bytes of the file. The calling thread faults the pages in (MAP_POPULATE),
        so a reader thread pays for them, not the math; the mapping is unmapped when the last
        tensor viewing it is freed, so the resident set holds only the blocks still alive
        (unlike `safe_open`, whose mapping of the whole file stays). Copy-on-write: a write
        to the view never reaches the file. A file shorter than its header says is a
        StorageError here (reading past the end of a mapping would be a SIGBUS). A mounted
        file (see `remote`) is read into a fresh buffer instead."""
        import torch  # the torch pass's reads (see `dtypes`)

        meta = self._metas[name]
        start, stop = rows if rows is not None else (0, meta.rows)
        shape = ((stop - start, *meta.shape[1:]) if meta.shape else ())
        nbytes = (stop - start) * meta.row_bytes
        if nbytes == 0:
            return torch.empty(shape, dtype=meta.dtype.torch)
        if remote_file(meta.path) is not None:  # in storage: a ranged GET, nothing to map
            return self.read(name, rows)
        fd = self._fd(meta.path)
        begin = meta.offset + start * meta.row_bytes
        if os.fstat(fd).st_size < begin + nbytes:
            raise StorageError(f"{meta.path}: truncated while reading {meta.name}")
        lead = begin % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, lead + nbytes, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=begin - lead)
        _populate_read(mapping)
        self.bytes_read += nbytes
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=lead)
        return raw.view(meta.dtype.torch).reshape(shape)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._opening:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = open_regular(path)
        return fd

    def _pread(self, meta: TensorMeta, offset: int, buf: np.ndarray) -> None:
        remote = remote_file(meta.path)
        if remote is not None:  # a ranged GET straight into the buffer
            remote.read_into(offset, memoryview(buf))
        else:
            pread_into(self._fd(meta.path), memoryview(buf), offset, path=meta.path,
                       name=meta.name)
        self.bytes_read += buf.size

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _populate_read(mapping: mmap.mmap) -> None:
    """Map a private mapping's pages from the page cache now, read-only (copy-on-write on a
    later write), in the calling thread. Not MAP_POPULATE: on a writable private mapping it
    faults every page in for writing, copying the whole block into fresh anonymous memory (a
    probe: 1.4 s of system time per 2 GB against 0.06 s this way). Kernels before 5.14 lack
    MADV_POPULATE_READ: the pages are then faulted in where they are first read."""
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except OSError:
        pass


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_model_files(src_dir: Path, out_dir: Path, *, dtype: Dtype | None = None,
                     skip: Iterable[str] = ()) -> list[Path]:
    """Copy config, generation config and tokenizer files (everything but weights) from the
    base; with `dtype`, config.json records the output dtype instead of the base's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied, skip = [], set(skip)
    for path in sorted(p for p in Path(src_dir).iterdir() if p.is_file()):
        if is_weight_file(path.name) or path.name in skip:
            continue
        target = out_dir / path.name
        if path.name == "config.json" and dtype is not None:
            config = json.loads(path.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = str(dtype).removeprefix("torch.")
            target.write_text(json.dumps(config, indent=2))
        else:
            shutil.copyfile(path, target)
        copied.append(target)
    return copied
