"""The shared random projection of gradients: a seeded count-sketch.

MERIT compares per-source gradients of millions to billions of parameters; we only need their
cosines, so every gradient is compressed to `dim` numbers by one Johnson-Lindenstrauss-type
projection shared by all sources (and all machines). A count-sketch sends element j of a
parameter to bucket h(j) in [0, dim) with sign s(j) in {-1, +1}: sketch[h(j)] += s(j) * x[j].
It is linear (sketch of a sum = sum of sketches, so micro-batches can be sketched one at a
time), costs one pass over the values, and never builds a (parameters x dim) matrix: the hashes
of a parameter are regenerated chunk by chunk from a seed, so the state is O(dim) per source
plus one chunk (and an optional bounded cache of hashes).

Identical on any machine and computed where the values are: element j of the parameter called
`name` hashes as splitmix64(key(seed, name) + (j + 1) * golden), integer arithmetic on the
values' device (wrapping int64 arithmetic is exact on CPUs and GPUs alike), with key the first
63 bits of sha256(seed, name). The hash of an element depends only on (seed, name, global
index), never on chunking, devices, threads or arrival order, so a rank holding rows
[r0, r1) of a sharded parameter sketches them with their global indices and the sum over ranks
(an all-reduce of the dim-vectors) is exactly the sketch of the whole parameter. The previous
projection (a CPU Mersenne Twister per 2^20-element chunk) was `count-sketch/mt19937-sha256-v1`;
sketches of different projections are never compared. This module only projects;
gradients.py decides what to project.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

CHUNK = 1 << 20  # elements hashed at once (a memory bound only: not part of the definition)
PROJECTION = "count-sketch/splitmix64-v2"
DEFAULT_CACHE_BYTES = 256 << 20


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9),
                         _signed(0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def tensor_key(seed: int, name: str) -> int:
    """The 63-bit hash key of one parameter."""
    digest = hashlib.sha256(f"meritrun-sketch-v2:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def element_hashes(key: int, start: int, length: int, dim: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed hashes of elements [start, start + length): 2 * bucket + (1 if the sign is +)."""
    z = torch.arange(start + 1, start + length + 1, dtype=torch.int64, device=device)
    z = z * _GOLDEN + key
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return ((_shr(z, 1) % dim) * 2 + (z & 1)).to(torch.int32)


class CountSketch:
    """One seeded count-sketch of dimension dim, applied parameter by parameter.

    `cache_bytes` bounds the packed hashes kept between calls (4 bytes per element, on the
    values' device); parameters that do not fit are regenerated on every call. The cache only
    trades memory for speed: the result is the same either way.
    """

    def __init__(self, dim: int, *, seed: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not 1 <= dim < 1 << 30:
            raise ValueError(f"sketch dimension must be in [1, 2^30), got {dim}")
        self.dim, self.seed, self.cache_bytes = dim, seed, cache_bytes
        self._cache: dict[tuple[str, int, str], list[torch.Tensor]] = {}
        self.cached_bytes = 0
        self.peak_scratch_bytes = 0

    def hashes(self, name: str, numel: int, device: torch.device,
               offset: int = 0) -> Iterator[torch.Tensor]:
        """Packed hashes of elements [offset, offset + numel) of a parameter, chunk by chunk."""
        key = (name, numel, str(device), offset)
        cached = self._cache.get(key)
        if cached is not None:
            yield from cached
            return
        keep = self.cached_bytes + 4 * numel <= self.cache_bytes
        chunks, param_key = [], tensor_key(self.seed, name)
        for start in range(0, numel, CHUNK):
            packed = element_hashes(param_key, offset + start, min(CHUNK, numel - start),
                                    self.dim, device)
            if keep:
                chunks.append(packed)
            yield packed
        if keep:
            self._cache[key] = chunks
            self.cached_bytes += 4 * numel

    def add(self, out: torch.Tensor, name: str, values: torch.Tensor, *,
            offset: int = 0) -> None:
        """out += sketch(values) for the parameter called name (out: shape (dim,)); `values`
        are its flat elements from global index `offset` on (a shard of it, or all of it)."""
        flat = values.detach().reshape(-1)
        scratch = torch.zeros(self.dim, dtype=torch.float32, device=flat.device)
        start = 0
        for packed in self.hashes(name, flat.numel(), flat.device, offset):
            segment = flat[start:start + packed.numel()].float()
            signed = torch.where((packed & 1).bool(), segment, -segment)
            scratch.index_add_(0, packed >> 1, signed)
            start += packed.numel()
            # packed + the bool mask + the signed copy: what one chunk holds at once
            self.peak_scratch_bytes = max(self.peak_scratch_bytes, 9 * packed.numel())
        out += scratch.to(out.dtype)

    def project(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """sketch(values) as a new float64 vector (CPU or the values' device)."""
        out = torch.zeros(self.dim, dtype=torch.float64, device=values.device)
        self.add(out, name, values)
        return out


def shard_offset(global_rows: int, rank: int, world: int) -> int:
    """First row a rank holds of a dim-0 sharded tensor (torch.chunk's split, as FSDP2 and
    DTensor's Shard(0) use)."""
    return min(rank * -(-global_rows // world), global_rows)


def add_sharded(sketch: CountSketch, out: torch.Tensor, name: str, values: torch.Tensor, *,
                rank: int, world: int) -> None:
    """out += this rank's part of sketch(values) for a Shard(0) DTensor (or a plain tensor
    when world is 1); all-reducing `out` over the ranks then gives the whole sketch."""
    local = values.to_local() if hasattr(values, "to_local") else values
    row = 1
    for d in values.shape[1:]:
        row *= int(d)
    offset = shard_offset(int(values.shape[0]), rank, world) * row if values.ndim else 0
    sketch.add(out, name, local, offset=offset)
