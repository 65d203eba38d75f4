"""The verify pass of a streamed merge: each weight file read once, front to back.

A file's sha256 is only known after its last byte, and a merge reads tensors in the base's
order, not in each file's. So a merge from storage reads every input twice, never more: this
pass streams each file sequentially (big ranged GETs), hashing it and checking its stored
values on the way (NaN/Inf, magnitude; second moments non-negative), and the merge pass that
follows reads only files that passed. The update norms need the base beside each expert, so
the merge pass computes them (`verification.NormScan`); nothing is published before they are
judged. The base's fingerprint comes from the same kind of pass over the base.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meritrun.artifacts import fingerprint_of, sha256_file
from meritrun.errors import ContributionRejected, StorageError

from .dtypes import WIDENED, Dtype, to_float32
from .io import HeaderError, read_header
from .remote import SequentialReader, mounted_in, remote_file
from .sources import PartitionSource

if TYPE_CHECKING:
    import torch

# No trained weight comes near this; K of them (or their squares) stay finite in fp32/fp64,
# so a contribution above it is refused rather than allowed to overflow a merge.
MAX_MAGNITUDE = 1e15


def value_problem(name: str, t: torch.Tensor, *, moments: bool = False
                  ) -> tuple[str, str] | None:
    """(check, detail) when the values of `t` (tensor `name`) may not be merged, else None."""
    import torch  # the torch pass's blocks (`bounds_problem` is the rule, without torch)

    if not t.numel():
        return None
    low, high = map(float, torch.aminmax(t))  # NaN propagates; one pass (10x a bf16 sum)
    return bounds_problem(name, low, high, moments=moments)


def bounds_problem(name: str, low: float, high: float, *, moments: bool = False
                   ) -> tuple[str, str] | None:
    """`value_problem` of values whose least and greatest are low and high (NaN when any
    value is NaN)."""
    if moments:
        if not (low >= 0 and high <= MAX_MAGNITUDE):  # NaN compares false: refused
            return "second-moments", (f"{name}: moments in [{low:.3g}, {high:.3g}] (negative, "
                                      f"non-finite or above {MAX_MAGNITUDE:.0e})")
        return None
    if not (math.isfinite(low) and math.isfinite(high)):
        return "non-finite", f"NaN/Inf in {name}"
    peak = max(abs(low), abs(high))
    if peak > MAX_MAGNITUDE:
        return "magnitude", (f"{name}: |value| up to {peak:.3g}, above the {MAX_MAGNITUDE:.0e}"
                             " no trained weight reaches (a merge of it would overflow)")
    return None


def stream_file(path: Path, *, moments: bool = False, chunk: int | None = None
                ) -> tuple[str, tuple[str, str] | None]:
    """(sha256, first value problem or None) of one file, read once from its first byte.

    A safetensors file's tensors are checked as they pass (its header was validated by
    `read_header`, so they tile the data area); any other file is only hashed.
    """
    metas = read_header(path)[0] if path.name.endswith(".safetensors") else None
    problem = None
    with SequentialReader(path, **({"chunk": chunk} if chunk else {})) as reader:
        if metas is not None:
            first = min((m.offset for m in metas.values()), default=reader.size)
            _skip(reader, first)
            for meta in metas.values():
                for piece in _pieces(reader, meta.nbytes, meta.dtype.itemsize):
                    if problem is None and meta.dtype.is_floating_point and len(piece):
                        problem = _piece_problem(meta.name, piece, meta.dtype, moments)
        return reader.drain(), problem


def _piece_problem(name: str, piece: memoryview, dtype: Dtype, moments: bool
                   ) -> tuple[str, str] | None:
    """`value_problem` of stored values: without torch (a compiled pass over the bits, else
    numpy) for the dtypes the fused kernels or numpy widen; torch for the rest (fp8)."""
    raw = np.frombuffer(piece, np.uint8)
    compiled = _compiled_bounds()
    bounds = compiled(raw, dtype.name) if compiled is not None else None
    if bounds is None and dtype.name in WIDENED:
        values = to_float32(raw, dtype)
        bounds = float(values.min()), float(values.max())  # NaN propagates
    if bounds is not None:
        return bounds_problem(name, *bounds, moments=moments)
    import torch  # fp8: the torch pass's dtypes

    return value_problem(name, torch.frombuffer(piece, dtype=dtype.torch), moments=moments)


@functools.cache
def _compiled_bounds() -> Callable[[np.ndarray, str], tuple[float, float] | None] | None:
    """fusedbounds.value_bounds, or None without numba (or no cache dir it can write)."""
    try:
        from .fusedbounds import value_bounds
    except Exception:  # noqa: BLE001 - numba missing, or no cache dir it can write
        return None
    return value_bounds


def _skip(reader: SequentialReader, n: int) -> None:
    while n > 0:
        n -= len(reader.take(min(n, reader.chunk)))


def _pieces(reader: SequentialReader, nbytes: int, itemsize: int) -> Iterable[memoryview]:
    step = max(itemsize, reader.chunk // itemsize * itemsize)
    while nbytes > 0:
        piece = reader.take(min(nbytes, step))
        nbytes -= len(piece)
        yield piece


def check_stream(source: PartitionSource, *, every_file: bool) -> None:
    """Stream the contribution's mounted files (with `every_file`, all its listed files) once:
    sha256 against the manifest first (a refusal naming the file), then the values."""
    name, manifest = source.name, source.manifest
    for rel, entry in sorted(manifest.files.items()):
        path = source.artifact_dir / rel
        if not every_file and remote_file(path) is None:
            continue  # downloaded, and its sha256 checked on the way
        is_moments = source.moments is not None and path == source.moments
        try:
            digest, problem = stream_file(path, moments=is_moments)
        except HeaderError as e:
            raise ContributionRejected(name, "safetensors-header", f"{rel}: {e.problem}") from e
        except (OSError, EOFError, StorageError) as e:  # short, or replaced since opened
            raise ContributionRejected(name, "sha256", f"{rel}: unreadable ({e})") from e
        if digest != entry.sha256:
            raise ContributionRejected(name, "sha256", f"{rel}: sha256 does not match")
        if problem is not None:
            raise ContributionRejected(name, *problem)


def model_fingerprint(model_dir: Path) -> str:
    """artifacts.base_fingerprint of a model whose files may be mounted (streamed once)."""
    model_dir = Path(model_dir)
    files = sorted({*model_dir.glob("*.safetensors"),
                    *(p for p in mounted_in(model_dir) if p.name.endswith(".safetensors"))})
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    return fingerprint_of({f.name: _file_sha256(f) for f in files})


_HASHED: dict[tuple, str] = {}  # the verification and the report both want the fingerprint


def _file_sha256(path: Path) -> str:
    """sha256 of a file; a mounted object is hashed once per version (its tag), so asking
    twice does not read the base from storage twice."""
    remote = remote_file(path)
    if remote is None:
        return sha256_file(path)
    version = (remote.uri, remote.size, remote.tag)
    if version not in _HASHED:
        with SequentialReader(path) as reader:
            _HASHED[version] = reader.drain()
    return _HASHED[version]
