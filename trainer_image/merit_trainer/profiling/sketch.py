"""The shared random projection of gradients: a seeded count-sketch.

MERIT compares per-source gradients of millions to billions of parameters; we only need their
cosines, so every gradient is compressed to `dim` numbers by one Johnson-Lindenstrauss-type
projection shared by all sources (and all machines). A count-sketch sends element j of a
parameter to bucket h(j) in [0, dim) with sign s(j) in {-1, +1}: sketch[h(j)] += s(j) * x[j].
It is linear (sketch of a sum = sum of sketches, so micro-batches can be sketched one at a
time), costs one pass over the values, and never builds a (parameters x dim) matrix: the hashes
of a parameter are regenerated chunk by chunk from a seed, so the state is O(dim) per source
plus one chunk (and an optional bounded cache of hashes).

Identical on any machine: for a given seed, parameter name and chunk index, the hashes come
from torch's CPU Mersenne Twister seeded with sha256(seed, name, chunk), so they do not depend
on the device, the thread count or the order parameters arrive in. This module only projects;
gradients.py decides what to project.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

CHUNK = 1 << 20  # elements per hash chunk; part of the projection's definition, never change
PROJECTION = "count-sketch/mt19937-sha256-v1"
DEFAULT_CACHE_BYTES = 256 << 20


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """Generator seed of one chunk of one parameter (63 bits of a sha256)."""
    digest = hashlib.sha256(f"meritrun-sketch:{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunk_hashes(seed: int, name: str, chunk: int, length: int, dim: int) -> torch.Tensor:
    """Packed hashes of one chunk: value = 2 * bucket + (1 if the sign is + else 0)."""
    generator = torch.Generator().manual_seed(chunk_seed(seed, name, chunk))
    return torch.empty(length, dtype=torch.int32).random_(0, 2 * dim, generator=generator)


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

    def hashes(self, name: str, numel: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Packed hashes of a parameter with numel elements, chunk by chunk."""
        key = (name, numel, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            yield from cached
            return
        keep = self.cached_bytes + 4 * numel <= self.cache_bytes
        chunks = []
        for index, start in enumerate(range(0, numel, CHUNK)):
            packed = chunk_hashes(self.seed, name, index, min(CHUNK, numel - start), self.dim)
            packed = packed.to(device, non_blocking=True)
            if keep:
                chunks.append(packed)
            yield packed
        if keep:
            self._cache[key] = chunks
            self.cached_bytes += 4 * numel

    def add(self, out: torch.Tensor, name: str, values: torch.Tensor) -> None:
        """out += sketch(values) for the parameter called name (out: shape (dim,))."""
        flat = values.detach().reshape(-1)
        scratch = torch.zeros(self.dim, dtype=torch.float32, device=flat.device)
        start = 0
        for packed in self.hashes(name, flat.numel(), flat.device):
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
