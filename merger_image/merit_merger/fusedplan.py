"""The plan of a fused merge: what a method's kernels are prepared from and what they return.

`fusedmerge` runs the pass; each method with kernels (`fused` for the linear ones,
`fusedota`, `fusedtiesplan`) has a `FusedMethod` whose `prepare(merge)` returns the maker of
each tensor's `Plan`. These types live apart from `fusedmerge` so that the methods' modules
import them and `fusedmerge` imports the methods, with no cycle. No numba here: a merge
without it still imports `fusedmerge` and takes the torch pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fusedunits import Files, Kernel
from .io import TensorMeta

# elements per unit at most: 512 KiB per bf16 input, so a unit's buffers stay near the core
# (1B parameters, K = 4: 1.9 s of system time at 2^18 against 4-6 s at 2^20, load 4-5)
UNIT_ELEMENTS = 1 << 18

@dataclass(frozen=True)
class Merge:
    """What a method's kernels are prepared from, once per merge."""

    method: str
    params: Any
    weights: Sequence[float]  # the token weights, renormalised over the experts
    k: int
    files: Files  # fds of the inputs, closed after the pass
    moments: Sequence[Any] | None = None  # the experts' MomentReaders, when the method has them
    # a tensor of at most this many elements is one unit (its kernel sees all of it at once)
    unit_elements: int = UNIT_ELEMENTS
    block_elements: int = UNIT_ELEMENTS  # the engine's block size (the torch pass's blocks)
    # scan(tensor, kernel, held=None, extra=(), counters=()): a pass over the tensor's experts
    # and base before its units are merged (TIES counts its thresholds so), unit by unit on
    # the pool's threads, the kernel accumulating what it counts itself; returns when every
    # unit is done. With
    # `held` (hold's arrays) the units read nothing: the kernel gets the arrays' addresses.
    # `extra`: further inputs read after the base (stored moments), counted in `counters`
    scan: Callable[..., None] | None = None
    # hold(tensor, into=None, kernel=None): its experts and base read whole into memory,
    # unit by unit on the pool (a plan that reads them once for several passes: Plan.held),
    # into the starts of `into`'s arrays (uint8, large enough; reused) or new ones; each
    # unit then given to `kernel` (the held arrays' addresses) on the thread that read it
    hold: Callable[..., list[np.ndarray]] | None = None
    # spill(sizes): arrays of these byte sizes on an unnamed scratch file (the output's disk),
    # mapped, to hold a tensor too large for memory (into `hold`) when its inputs come from
    # storage, so a plan of several passes GETs each byte once; None for local inputs (a
    # pread costs no round trip to repeat)
    spill: Callable[[list[int]], list[np.ndarray]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # the scans' wall time, "prepass"
    # the floating tensors with elements, in order (a pre-pass over the whole model: FFG)
    tensors: Sequence[Tensor] = ()
    # what a method reports: its TensorStats per floating tensor (FFG's kept counts and
    # fallbacks), its thresholds over the whole model (FFG's, one per expert)
    stats: dict[str, Any] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Tensor:
    """One floating-point tensor to merge: its inputs as stored and its output's dtype."""

    name: str
    base: TensorMeta
    experts: tuple[TensorMeta, ...]
    out_dtype: Any

    def codes(self, *metas: TensorMeta) -> np.ndarray:
        """The kernels' dtype codes of the experts, the base, `metas`, then the output."""
        dtypes = [m.dtype for m in (*self.experts, self.base, *metas)] + [self.out_dtype]
        from .fused import CODES  # numba: only once kernels run

        return np.asarray([CODES[d.name] for d in dtypes], np.int64)


@dataclass(frozen=True)
class Plan:
    """How one tensor's units are merged."""

    kernel: Kernel
    reads_base: bool
    # further stored inputs of the tensor's shape, read unit by unit after the base (each
    # counted in `counters`, the reader whose bytes_read it adds to)
    extra: tuple[TensorMeta, ...] = ()
    counters: tuple[Any, ...] = ()
    # the experts and the base are in the kernel's closure (Merge.hold read them): the units
    # read neither, and their addresses there are not theirs; held_at: where they are held
    # (the experts', then the base's), for a streamed merge's norm scan (`fusedscan`)
    held: bool = False
    held_at: np.ndarray | None = None
    stored_moments: bool = False  # `extra` are the experts' stored second moments, in order
    # the pool threads' host buffers of its units (np.empty's when None; `gpuunits`: pinned)
    alloc: Callable[[int], np.ndarray] | None = None


@dataclass(frozen=True)
class FusedMethod:
    """A method's fused kernels: `prepare(merge)` -> the per-tensor plan maker; `unsupported`
    (params, moment readers or None) -> why this merge takes the torch pass, or None; `warm`
    compiles the kernels (see `warm` below)."""

    prepare: Callable[[Merge], Callable[[Tensor], Plan]]
    unsupported: Callable[[Any, Sequence[Any] | None], str | None] = lambda p, m: None
    warm: Callable[[], None] = lambda: None
