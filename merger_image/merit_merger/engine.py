"""The streaming merge engine: base + K partitions -> one HF model dir, block by block.

For every tensor of the base (in file order) the engine reads the same block of rows from
the base (when needed), every expert and every second-moment file, converts them to fp32,
hands them to the merge method, casts the result to the output dtype and writes it straight
to its place in a pre-planned output shard. Element-wise methods get blocks of at most
`chunk_elements` elements; TIES and DARE get whole tensors. A reader thread maps the next
block while the current one is merged (see `blocks`) and a writer thread writes the previous
one (see `writer`), so reading and writing overlap the math; the math runs in the main
thread in reused buffers (the method's fp32 result, a ring of output blocks). Peak memory is
a few blocks per input (for whole-tensor methods, a few copies of the largest tensor per
input) plus the method's temporaries, never the model or an output shard.

Threads: element-wise methods on the CPU cut each block into pieces of rows merged by one
thread per core, each with one torch intra-op thread (see `pieces`: no OpenMP barrier per
op); the reader and writer threads spend little CPU (mapping pages already in the page cache,
copying the output into it). Whole-tensor methods keep torch's setting (their ops are large
enough to be worth splitting).

It does not verify contributions (see `verification`) and does not write the report (see
`report`): it merges what it is given and says what it did in a MergeResult.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meritrun.errors import StageFailed

from . import fusedmerge
from .blocks import Block, BlockLoader, Item, block_rows
from .io import ModelReader, copy_model_files, read_header
from .methods import MergeMethod, TensorStats, get_method, normalized
from .pieces import PieceRunner
from .selection import KthLargest, keep_count
from .sources import ExpertReader, PartitionSource, open_moments
from .thresholds import tensor_thresholds
from .torchpass import torch_pass
from .writer import OutputTensor, ShardedWriter

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # 1M elements: 4 MiB per fp32 buffer, K + 1 of them per slot
HOLD_BLOCKS = 5  # TIES's pre-pass keeps the |tau| of a tensor of up to 5 blocks per expert
Progress = Callable[[int, int], None]


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    params: dict[str, Any]
    partitions: list[str]
    weights: dict[str, float]
    output_dtype: str
    files: list[Path] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] | None = None
    kernel: str = "torch"  # the merge pass: "fused" (fusedmerge) or "torch"
    tensor_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


class MergeOutputError(StageFailed):
    """The merged model is not what was planned (a non-finite value, a name, shape or dtype
    off): nothing is published."""


def check_output(files: Sequence[Path], planned: Sequence[OutputTensor]) -> None:
    """The written shards hold exactly the planned tensors, names, dtypes and shapes (their
    headers re-read and validated like any input's)."""
    found: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for path in files:
        if path.name.endswith(".safetensors"):
            metas, _ = read_header(path)
            found |= {n: (m.dtype, m.shape) for n, m in metas.items()}
    want = {t.name: (t.dtype, tuple(t.shape)) for t in planned}
    if found != want:
        diff = sorted(n for n in want.keys() | found.keys() if want.get(n) != found.get(n))
        raise MergeOutputError(f"merged model does not match its plan at {diff[:3]}")


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    dtype = getattr(torch, aliases.get(value, value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {value!r}")
    return dtype


def math_threads(method: MergeMethod, device: torch.device) -> int:
    """Threads merging pieces of a block (see `pieces`): one per core for element-wise
    methods on the CPU, none for the others (they run in the main thread)."""
    if device.type != "cpu" or not method.elementwise:
        return 1
    return len(os.sched_getaffinity(0))


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during the passes: every block allocates Python objects
    (views, mappings, futures) and the collections that triggered took 4% of a merge's
    samples, walking torch's objects; nothing a merge allocates needs the cycle collector
    before it ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ffg_thresholds(method: MergeMethod, params: Any, inputs: BlockLoader,
                   items: Sequence[Item], *, density: float,
                   device: torch.device) -> list[float]:
    """Pre-pass: each expert's global FFG threshold t_i (two streaming passes, exact)."""
    floats = [it for it in items if inputs.base.meta(it[0]).dtype.is_floating_point]
    numel = sum(inputs.base.meta(n).numel for n in dict.fromkeys(n for n, _ in floats))
    selectors = [KthLargest(keep_count(numel, density)) for _ in inputs.experts]
    for first in (True, False):
        for block in inputs.blocks(floats, device):
            for i, sel in enumerate(selectors):
                s = method.saliency(block.base, block.experts[i], block.moments[i], params)
                (sel.add_first if first else sel.add_second)(s)
        if first:
            for sel in selectors:
                sel.end_first()
    return [sel.result() for sel in selectors]


def merge_models(
    *,
    base_dir: Path,
    partitions: Sequence[PartitionSource],
    method: str,
    params: Mapping[str, Any] | None = None,
    out_dir: Path,
    shard_size_bytes: int,
    output_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Callable[[Block], None] | None = None,
) -> MergeResult:
    """Merge the partitions into an HF model dir at out_dir; see the module docstring.

    `observe` sees every block (with the base) before it is merged: a streamed merge judges
    the update norms in this pass instead of in a pass of its own; what it raises aborts."""
    if not partitions:
        raise ValueError("nothing to merge: no partitions")
    started, dev = time.monotonic(), torch.device(device)
    impl = get_method(method)
    p = impl.parse_params(dict(params or {}))
    dtype = parse_dtype(output_dtype)
    weights = normalized([s.tokens for s in partitions])
    base = ModelReader(base_dir)
    experts = [ExpertReader(s, base) for s in partitions]
    moments = open_moments(list(partitions)) if impl.needs_moments else None
    inputs = BlockLoader(base, experts, moments, need_base=impl.uses_base(p) or bool(observe),
                         convert=not impl.stored_dtype_ok)
    floats = [base.meta(n).dtype for n in base.names if base.meta(n).dtype.is_floating_point]
    result = MergeResult(Path(out_dir), impl.key, _params_dict(p), [s.name for s in partitions],
                         dict(zip([s.name for s in partitions], weights, strict=True)),
                         str(dtype or (floats[0] if floats else "none")).removeprefix("torch."))
    threads = math_threads(impl, dev)
    runner = PieceRunner(threads)
    try:
        with intra_op_threads(1 if threads > 1 else torch.get_num_threads()), gc_paused():
            _merge(impl, p, inputs, runner, result, out_dir=Path(out_dir), base_dir=Path(base_dir),
                   dtype=dtype, weights=weights, device=dev, chunk_elements=chunk_elements,
                   shard_size_bytes=shard_size_bytes, progress=progress, observe=observe,
                   started=started)
    finally:
        runner.close()
        result.bytes_read = inputs.bytes_read()
        inputs.close()
    result.seconds["total"] = round(time.monotonic() - started, 3)
    log.info("merged %d partitions with %s in %.1f s (%.2f GB read, %.2f GB written)",
             len(partitions), impl.key, result.seconds["total"], result.bytes_read / 1e9,
             result.bytes_written / 1e9)
    return result


def _merge(impl: MergeMethod, p: Any, inputs: BlockLoader, runner: PieceRunner,
           result: MergeResult, *, out_dir: Path, base_dir: Path, dtype: torch.dtype | None,
           weights: list[float], device: torch.device, chunk_elements: int,
           shard_size_bytes: int, progress: Progress | None,
           observe: Callable[[Block], None] | None, started: float) -> None:
    """The pre-passes (thresholds), then the merge pass into planned shards; fills result."""
    base = inputs.base
    metas = [base.meta(n) for n in base.names]
    items = [(m.name, rows) for m in metas
             for rows in block_rows(m, chunk_elements, elementwise=impl.elementwise)]
    model_wide: list[float] | None = None  # FFG: one threshold per expert
    per_tensor: dict[str, list[float]] = {}  # TIES: one per expert and tensor
    if impl.needs_thresholds(p):
        model_wide = ffg_thresholds(impl, p, inputs, items, density=p.density, device=device)
        result.thresholds = dict(zip(result.partitions, model_wide, strict=True))
    elif impl.needs_tensor_thresholds(p):
        per_tensor = tensor_thresholds(impl, p, inputs, items, device=device, map_fn=runner.map,
                                       hold_elements=HOLD_BLOCKS * chunk_elements)
    if impl.needs_thresholds(p) or impl.needs_tensor_thresholds(p):
        result.seconds["prepass"] = round(time.monotonic() - started, 3)
    outputs = [OutputTensor(m.name, dtype if dtype and m.dtype.is_floating_point else m.dtype,
                            m.shape) for m in metas]
    why_not = fusedmerge.unsupported(impl.key, base, [e.model for e in inputs.experts],
                                     device=device.type, observing=observe is not None,
                                     output_dtype=dtype, params=p,
                                     moments=inputs.moments)
    result.kernel = "fused" if why_not is None else "torch"
    log.info("merge pass: %s", "fused kernels (numba)" if why_not is None
             else f"torch ({why_not})")
    writer = ShardedWriter(out_dir, outputs, shard_size_bytes=shard_size_bytes)
    out_dtypes = {o.name: o.dtype for o in outputs}
    merge_started = time.monotonic()
    stats: dict[str, TensorStats] = {}
    try:
        if why_not is None:
            fusedmerge.merge_pass(
                impl.key, p, base=base, experts=[e.model for e in inputs.experts],
                weights=weights, writer=writer, out_dtypes=out_dtypes,
                threads=runner.threads, unit_elements=chunk_elements,
                progress=progress, moments=inputs.moments,
                on_non_finite=lambda name: _non_finite(name, impl, p))
            stats = {m.name: TensorStats() for m in metas if m.dtype.is_floating_point}
        else:
            torch_pass(impl, p, inputs, runner, writer, stats, out_dtypes=out_dtypes,
                       items=items, thresholds=(per_tensor, model_wide), weights=weights,
                       device=device, progress=progress, observe=observe,
                       on_non_finite=lambda name: _non_finite(name, impl, p))
        result.files = writer.close()
    except BaseException:
        writer.abort()
        raise
    try:
        check_output(result.files, outputs)
    except MergeOutputError:
        for path in result.files:
            path.unlink(missing_ok=True)
        raise
    result.files += copy_model_files(base_dir, out_dir, dtype=dtype)
    result.seconds["merge"] = round(time.monotonic() - merge_started, 3)
    result.bytes_written = writer.bytes_written
    result.tensor_stats = _tensor_stats(stats, base, len(result.partitions), result.partitions)


def _non_finite(name: str, impl: MergeMethod, p: Any) -> MergeOutputError:
    return MergeOutputError(f"merged {name} has NaN/Inf values ({impl.key} with "
                            f"{_params_dict(p)})")


def _params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}


def _tensor_stats(stats: Mapping[str, TensorStats], base: ModelReader, k: int,
                  names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, s in stats.items():
        entry: dict[str, Any] = {"numel": base.meta(name).numel}
        if s.kept is not None:
            entry["kept_fraction"] = {p: kept / max(1, entry["numel"])
                                      for p, kept in zip(names, s.kept, strict=True)}
            entry["fallback_elements"] = s.fallback
        out[name] = entry
    return out
