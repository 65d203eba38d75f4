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

The engine decides the pass first: the fused kernels (`fusedmerge`) where they cover the
merge, else the torch pass (`torchpass`: every method, the threshold pre-passes, a GPU). It
imports torch only for the torch pass, so a fused merge never loads it (importing torch is
about 3 s of a 6 s merge of a 1B model); hence dtypes as `dtypes.Dtype`, not torch's.

Threads (`threads`, default one per core this process may run on): the fused pass and the
torch pass's element-wise methods on the CPU run one unit or piece of rows per thread (see
`pieces`: one torch intra-op thread each, no OpenMP barrier per op); the reader and writer
threads spend little CPU. Whole-tensor methods get `threads` as torch's intra-op threads
(torch's own setting when not given: their ops are large enough to be worth splitting).

It does not verify contributions (see `verification`) and does not write the report (see
`report`): it merges what it is given and says what it did in a MergeResult.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meritrun.errors import StageFailed

from . import fusedmerge
from .dtypes import Dtype, parse_dtype
from .io import ModelReader, copy_model_files, read_header
from .methods import MergeMethod, TensorStats, get_method, normalized
from .moments import MomentReader
from .sources import ExpertReader, PartitionSource, open_moments
from .writer import OutputTensor, ShardedWriter

if TYPE_CHECKING:
    import torch

    from .blocks import Block

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # 1M elements: 4 MiB per fp32 buffer, K + 1 of them per slot
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
    # the merge pass: "fused" (fusedmerge), "fused-gpu" (its units on a GPU: gpuunits), "torch"
    kernel: str = "torch"
    tensor_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


class MergeOutputError(StageFailed):
    """The merged model is not what was planned (a non-finite value, a name, shape or dtype
    off): nothing is published."""


@dataclass(frozen=True)
class Inputs:
    """The readers of one merge: the base, each partition's weights, their second moments
    (for the methods that read them)."""

    base: ModelReader
    experts: list[ExpertReader]
    moments: list[MomentReader] | None

    def bytes_read(self) -> int:
        readers = [self.base, *self.experts, *(self.moments or [])]
        return sum(r.bytes_read for r in readers)

    def close(self) -> None:
        for reader in [self.base, *self.experts, *(self.moments or [])]:
            reader.close()


def check_output(files: Sequence[Path], planned: Sequence[OutputTensor]) -> None:
    """The written shards hold exactly the planned tensors, names, dtypes and shapes (their
    headers re-read and validated like any input's)."""
    found: dict[str, tuple[Dtype, tuple[int, ...]]] = {}
    for path in files:
        if path.name.endswith(".safetensors"):
            metas, _ = read_header(path)
            found |= {n: (m.dtype, m.shape) for n, m in metas.items()}
    want = {t.name: (t.dtype, tuple(t.shape)) for t in planned}
    if found != want:
        diff = sorted(n for n in want.keys() | found.keys() if want.get(n) != found.get(n))
        raise MergeOutputError(f"merged model does not match its plan at {diff[:3]}")


def device_type(device: str | torch.device) -> str:
    """`cpu`, `cuda`, ... of a device given by name or as a torch device (torch not asked)."""
    return str(device).split(":")[0]


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


def merge_models(
    *,
    base_dir: Path,
    partitions: Sequence[PartitionSource],
    method: str,
    params: Mapping[str, Any] | None = None,
    out_dir: Path,
    shard_size_bytes: int,
    output_dtype: Dtype | torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Callable[[Block], None] | None = None,
    threads: int | None = None,
) -> MergeResult:
    """Merge the partitions into an HF model dir at out_dir; see the module docstring.

    `observe` sees every block (with the base) before it is merged: a streamed merge judges
    the update norms in this pass instead of in a pass of its own; what it raises aborts.
    The fused pass gives it its units' judgments instead (`observe.judged`, see
    verification.NormScan); an observer without `judged` takes the torch pass.
    `threads`: CPU threads of the math (default: one per core this process may run on)."""
    if not partitions:
        raise ValueError("nothing to merge: no partitions")
    started = time.monotonic()
    impl = get_method(method)
    p = impl.parse_params(dict(params or {}))
    dtype = parse_dtype(output_dtype)
    weights = normalized([s.tokens for s in partitions])
    base = ModelReader(base_dir)
    inputs = Inputs(base, [ExpertReader(s, base) for s in partitions],
                    open_moments(list(partitions)) if impl.needs_moments else None)
    floats = [base.meta(n).dtype for n in base.names if base.meta(n).dtype.is_floating_point]
    result = MergeResult(Path(out_dir), impl.key, _params_dict(p), [s.name for s in partitions],
                         dict(zip([s.name for s in partitions], weights, strict=True)),
                         str(dtype or (floats[0] if floats else "none")).removeprefix("torch."))
    try:
        with gc_paused():
            _merge(impl, p, inputs, result, out_dir=Path(out_dir), base_dir=Path(base_dir),
                   dtype=dtype, weights=weights, device=device, threads=threads,
                   chunk_elements=chunk_elements, shard_size_bytes=shard_size_bytes,
                   progress=progress, observe=observe, started=started)
    finally:
        result.bytes_read = inputs.bytes_read()
        inputs.close()
    result.seconds["total"] = round(time.monotonic() - started, 3)
    log.info("merged %d partitions with %s in %.1f s (%.2f GB read, %.2f GB written)",
             len(partitions), impl.key, result.seconds["total"], result.bytes_read / 1e9,
             result.bytes_written / 1e9)
    return result


def _merge(impl: MergeMethod, p: Any, inputs: Inputs, result: MergeResult, *, out_dir: Path,
           base_dir: Path, dtype: Dtype | None, weights: list[float],
           device: str | torch.device, threads: int | None, chunk_elements: int,
           shard_size_bytes: int, progress: Progress | None,
           observe: Callable[[Block], None] | None, started: float) -> None:
    """Choose the pass, run it (the torch pass after its pre-passes) into planned shards;
    fills result."""
    base = inputs.base
    metas = [base.meta(n) for n in base.names]
    outputs = [OutputTensor(m.name, dtype if dtype and m.dtype.is_floating_point else m.dtype,
                            m.shape) for m in metas]
    out_dtypes = {o.name: o.dtype for o in outputs}
    why_not = fusedmerge.unsupported(impl.key, base, [e.model for e in inputs.experts],
                                     device=device_type(device), output_dtype=dtype, params=p,
                                     moments=inputs.moments)
    if why_not is None and observe is not None and not hasattr(observe, "judged"):
        why_not = "the merge pass's observer takes torch blocks only"
    on_gpu = device_type(device) != "cpu"
    result.kernel = "torch" if why_not is not None else "fused-gpu" if on_gpu else "fused"
    log.info("merge pass: %s", f"torch ({why_not})" if why_not is not None
             else "fused kernels (triton, on the GPU)" if on_gpu else "fused kernels (numba)")
    write = dict(result=result, outputs=outputs, out_dir=out_dir, base_dir=base_dir,
                 dtype=dtype, shard_size_bytes=shard_size_bytes)
    stats: dict[str, TensorStats] = {}
    on_non_finite = functools.partial(_non_finite, impl=impl, p=p)
    if why_not is None:  # its scans (TIES's, FFG's thresholds) are its "prepass" seconds
        stats = {m.name: TensorStats() for m in metas if m.dtype.is_floating_point}
        model_wide: list[float] = []
        _write(lambda writer: result.seconds.update(fusedmerge.merge_pass(
            impl.key, p, base=base, experts=[e.model for e in inputs.experts],
            weights=weights, writer=writer, out_dtypes=out_dtypes,
            threads=threads or len(os.sched_getaffinity(0)), unit_elements=chunk_elements,
            progress=progress, moments=inputs.moments, on_non_finite=on_non_finite,
            observe=observe, stats=stats, thresholds=model_wide,
            device=device_type(device))), **write)
        if model_wide:
            result.thresholds = dict(zip(result.partitions, model_wide, strict=True))
    else:
        from .torchpass import TorchPass  # imports torch: only here

        with TorchPass(impl, p, inputs.base, inputs.experts, inputs.moments, device=device,
                       threads=threads, chunk_elements=chunk_elements,
                       observing=observe is not None) as torch_pass:
            thresholds = torch_pass.thresholds()
            if thresholds.model_wide is not None:
                result.thresholds = dict(zip(result.partitions, thresholds.model_wide,
                                             strict=True))
            if thresholds.ran:
                result.seconds["prepass"] = round(time.monotonic() - started, 3)
            _write(lambda writer: torch_pass.run(
                writer, stats, out_dtypes=out_dtypes, thresholds=thresholds, weights=weights,
                progress=progress, observe=observe, on_non_finite=on_non_finite), **write)
    result.tensor_stats = _tensor_stats(stats, base, len(result.partitions), result.partitions)


def _write(run: Callable[[ShardedWriter], None], *, result: MergeResult,
           outputs: Sequence[OutputTensor], out_dir: Path, base_dir: Path,
           dtype: Dtype | None, shard_size_bytes: int) -> None:
    """The merge pass `run` into planned shards, checked, then the base's other files."""
    merge_started = time.monotonic()
    writer = ShardedWriter(out_dir, outputs, shard_size_bytes=shard_size_bytes)
    try:
        run(writer)
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
