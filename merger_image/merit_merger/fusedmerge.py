"""The merge pass of the linear methods through the fused kernels (`fused`), no torch math.

Token-weighted, uniform and task arithmetic are sums over the inputs of each element. The
torch pass (`engine`) runs one torch op per input and block (a conversion pass, a multiply-
add pass, the cast back, a finiteness pass, each over memory). This pass cuts each tensor
into units of at most `UNIT_ELEMENTS` elements (or the engine's smaller block size), merged
by one thread per core: the unit's thread `pread`s its elements of every input into its own
buffers (reused unit after unit, so they stay in the core's cache), runs the kernel from
them into an output buffer and `pwrite`s it to its place in the output shard.

Why copies and not mappings: mapping the inputs (and the output, shared) cost more kernel
time than copying them. Measured on the 1B-parameter benchmark (K = 4, bf16, page cache):
7.6 s of system time mapping, populating and dropping 10 GB of pages (a page-table entry
per 4 KiB page, and a TLB shootdown on the other core for every range dropped), against
about 1.5 s for `pread`/`pwrite` of the same bytes; and the kernel maps a large page-cache
folio (up to 2 MiB) whole, so mapped ranges grew the resident set by 2 MiB per input and
thread whatever the range.

Same bits as the torch pass (the kernels follow its arithmetic, tested bit for bit), the
same refusal of a non-finite output, the same output files. `unsupported` says why a merge
takes the torch pass instead: another method, a GPU, LoRA partitions, inputs read from
storage, a dtype the kernels do not take, or a merge pass that also scans the update norms.

Each method with kernels has a `FusedMethod` (`fusedplan`): once per merge its `prepare`
takes the `Merge` and returns what makes each tensor's `Plan` (the kernel as a callable
over a unit's addresses, whether the unit reads the base, and any further input streamed
like the experts); per-tensor arrays a kernel needs (factors, thresholds) live in its
closure. This module makes the units and runs them on the threads (`fusedunits`: where
a unit's inputs are read from, and one unit's read, kernel and write; `fusedreads`: the
reads a plan makes of a tensor before its units, scans and holding); it knows no arithmetic.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from . import fusedreads
from .fusedplan import UNIT_ELEMENTS, FusedMethod, Merge, Plan, Tensor
from .fusedunits import Files, Kernel, Unit, read, run, unread
from .io import ModelReader
from .remote import remote_file
from .writer import ShardedWriter, pwrite_all

try:  # the merger's extra installs numba; without it every merge takes the torch pass
    from . import fused, fusedbounds, fusedffg, fusedlinear, fusedscan, fusedties, fusedtiesplan

    _NO_KERNELS = ""
except Exception as e:  # noqa: BLE001 - numba missing, or no cache dir it can write
    fused = fusedscan = None  # type: ignore[assignment]
    _NO_KERNELS = f"the fused kernels are unavailable ({type(e).__name__}: {str(e)[:120]})"

# elements per unit when an input is read from storage, whatever the engine's block: each
# ranged GET costs a round trip and a request in Python (MinIO on loopback, load 7.6, one
# 96 MiB object: 62 / 215 / 249 MB/s and 3.8 / 1.1 / 0.8 s of client CPU per GB in GETs of
# 512 KiB / 2 MiB / 8 MiB; 81 / 296 / 356 MB/s ten at a time). 4 MiB per bf16 input
REMOTE_UNIT_ELEMENTS = 1 << 21
# on a GPU: fewer, larger launches (a launch costs microseconds; 4 MiB per bf16 input), the
# pinned host buffers (K + 2) x 4 MiB per thread at K = 4 bf16
_GPU_UNIT_ELEMENTS = 1 << 21


def _gpu_plans(merge: Merge) -> Callable[[Tensor], Plan]:
    """The plans of the GPU's kernels (`gpuunits`; imports torch and triton)."""
    from . import gpuunits

    if merge.method == "ota":
        return gpuunits.ota(merge)
    return fusedlinear.gpu_prepare(merge)


def _gpu_unsupported(method: str, params: Any, device: str) -> str | None:
    """Why the fused pass cannot run on `device` (not the CPU), or None."""
    if device != "cuda":
        return f"the merge runs on {device}"
    from . import gpuunits  # torch: only a merge on a GPU imports it

    return gpuunits.unsupported(method, params)


def _methods() -> dict[str, FusedMethod]:
    """The methods with kernels."""
    linear = fusedlinear.METHOD
    return {"token-weighted": linear, "uniform": linear, "task-arithmetic": linear,
            "ota": fusedffg.METHOD, "ties": FusedMethod(fusedtiesplan.prepare, warm=fusedties.warm)}


def warm() -> None:
    """Compile (or load from numba's on-disk cache) every method's kernels, so no merge pays
    for it: scripts/setup.sh and the merger image's build run this."""
    for compile_kernels in dict.fromkeys(m.warm for m in _methods().values()):
        compile_kernels()
    fusedscan.warm()
    fusedbounds.warm()


def unsupported(method: str, base: ModelReader, experts: Sequence[ModelReader | None], *,
                device: str, output_dtype: Any,
                params: Any = None, moments: Sequence[Any] | None = None) -> str | None:
    """Why this merge cannot take the fused path, or None when it can."""
    if fused is None:
        return _NO_KERNELS
    entry = _methods().get(method)
    if entry is None:
        return f"{method} has no fused kernel"
    why = entry.unsupported(params, moments)
    if why is not None:
        return why
    if device != "cpu" and (why := _gpu_unsupported(method, params, device)) is not None:
        return why
    if any(e is None for e in experts):
        return "a LoRA partition"
    for name in base.names:
        meta = base.meta(name)
        metas = [meta, *(e.meta(name) if name in e else None for e in experts)]
        if any(m is None or m.shape != meta.shape for m in metas):
            return f"tensor {name} differs between the inputs"
        if not meta.dtype.is_floating_point:
            continue
        dtypes = [m.dtype for m in metas] + [output_dtype or meta.dtype]
        if any(d.name not in fused.CODES for d in dtypes):
            return f"tensor {name}: a dtype the fused kernels do not take"
    return None


def merge_pass(method: str, params: Any, *, base: ModelReader,
               experts: Sequence[ModelReader], weights: Sequence[float], writer: ShardedWriter,
               out_dtypes: dict[str, Any], threads: int, unit_elements: int,
               on_non_finite: Callable[[str], Exception],
               progress: Callable[[int, int], None] | None = None,
               moments: Sequence[Any] | None = None, observe: Any = None,
               stats: dict[str, Any] | None = None,
               thresholds: list[float] | None = None, device: str = "cpu") -> dict[str, float]:
    """Write every output of `writer` at its place (the readers count the bytes read). A
    non-finite output raises on_non_finite(tensor name); the caller aborts the writer.
    `observe` (verification.NormScan): each unit's experts are judged and their update norms
    summed (`fusedscan`), given to observe.judged(tensor, judgments) in unit order before
    the unit's output is checked; what it raises aborts the pass.
    Returns the seconds of the method's scans ({"prepass": s}, TIES's thresholds) or {}.
    `stats` (TensorStats per floating tensor) and `thresholds` get what the method reports
    (FFG's kept counts, fallbacks and model-wide thresholds). `device` "cuda": the units'
    kernels run on the GPU (`gpuunits`; `unsupported` said it can)."""
    files = Files()
    pending: deque[tuple[Unit, Future]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="merge-fused")
    buffers = threading.local()  # each pool thread's own, reused unit after unit
    remote = any(remote_file(p) is not None for r in (base, *experts) for p in r.files)
    # a unit's GETs all at once: K experts, the base, K stored moments at most
    fetch = (ThreadPoolExecutor(threads * (2 * len(experts) + 1), thread_name_prefix="merge-get")
             if remote else None)
    try:
        block_elements = unit_elements
        unit_elements = REMOTE_UNIT_ELEMENTS if remote else min(
            unit_elements, UNIT_ELEMENTS if device == "cpu" else _GPU_UNIT_ELEMENTS)

        def scan(t: Tensor, kernel: Kernel, held: list[np.ndarray] | None = None,
                 extra: Sequence[Any] = (), counters: Sequence[Any] = ()) -> None:
            fusedreads.scan(pool, buffers, t, kernel, files, [*experts, base, *counters],
                            unit_elements, merge.seconds, held, fetch, tuple(extra))

        def hold(t: Tensor, into: list[np.ndarray] | None = None,
                 kernel: Kernel | None = None) -> list[np.ndarray]:
            return fusedreads.hold(pool, t, files, [*experts, base], unit_elements,
                                   merge.seconds, into, kernel, fetch)

        merge = Merge(method, params, weights, len(experts), files, moments,
                      unit_elements=unit_elements, block_elements=block_elements, scan=scan,
                      hold=hold,
                      spill=partial(fusedreads.spill, writer.out_dir) if remote else None,
                      tensors=_tensors(base, experts, out_dtypes),
                      stats=stats if stats is not None else {},
                      thresholds=thresholds if thresholds is not None else [])
        plan = _methods()[method].prepare(merge) if device == "cpu" else _gpu_plans(merge)
        units = _units(plan, base, experts, files, writer, out_dtypes, unit_elements,
                       judging=observe is not None, fetch=fetch)
        for unit in units:
            if isinstance(unit, str):  # done without the kernel
                if observe is not None and base.meta(unit).dtype.is_floating_point:
                    observe.judged(unit, fusedscan.judge_empty(len(experts)))
                writer.filled(unit)
                continue
            pending.append((unit, pool.submit(run, unit, buffers)))
            while len(pending) > 2 * threads:
                _finish(*pending.popleft(), writer, on_non_finite, observe)
                if progress is not None:
                    progress(writer.bytes_written, writer.total_bytes)
        while pending:
            _finish(*pending.popleft(), writer, on_non_finite, observe)
        return {key: round(value, 3) for key, value in merge.seconds.items()}
    finally:
        for _, job in pending:
            job.cancel()
        pool.shutdown(wait=True)  # no unit may write into a file being removed
        if fetch is not None:
            fetch.shutdown(wait=True)
        files.close()


def _units(plan_of: Callable[[Tensor], Plan], base: ModelReader, experts: Sequence[ModelReader],
           files: Files, writer: ShardedWriter, out_dtypes: dict[str, Any],
           unit_elements: int, judging: bool = False,
           fetch: ThreadPoolExecutor | None = None) -> Iterator[Unit | str]:
    """The units of work in tensor order; a tensor done without one (not a float: copied
    as stored here; empty) comes as its name. `judging`: each unit reads the base too, and
    scans its experts (`fusedscan`) before the kernel runs."""
    for name in base.names:
        meta = base.meta(name)
        out_fd, out_offset, nbytes = writer.place(name)
        if not meta.dtype.is_floating_point or meta.numel == 0:  # copied as stored
            raw = np.empty(nbytes, np.uint8)
            source, offset, _ = files.place(meta)
            read(source, memoryview(raw), offset, path=meta.path, name=name)
            base.bytes_read += nbytes
            pwrite_all(out_fd, memoryview(raw), out_offset)
            yield name
            continue
        metas = tuple(e.meta(name) for e in experts)
        t = Tensor(name, meta, metas, out_dtypes[name])
        plan = plan_of(t)
        reads_base = plan.reads_base or judging
        counted = list(zip(plan.counters, plan.extra, strict=True))
        if not plan.held:  # else counted by Merge.hold
            counted += [*zip(experts, metas, strict=True), *([(base, meta)] * reads_base)]
        for reader, m in counted:  # counted as the torch pass counts
            reader.bytes_read += m.nbytes
        base_place = files.place(meta)
        places = (*(unread(files.place(m), plan.held) for m in metas),
                  unread(base_place, plan.held or not reads_base),
                  *(files.place(m) for m in plan.extra),
                  (out_fd, out_offset, nbytes // meta.numel))
        paths = tuple(m.path for m in (*metas, meta, *plan.extra))
        scan = None if not judging else fusedscan.scanner(
            name, len(metas), t.codes(*plan.extra), stored=plan.stored_moments,
            held=plan.held_at)
        for lo in range(0, meta.numel, unit_elements):
            hi = min(lo + unit_elements, meta.numel)
            yield Unit(name, plan.kernel, lo=lo, hi=hi, places=places, paths=paths,
                       last=hi == meta.numel, scan=scan, fetch=fetch, alloc=plan.alloc)


def _tensors(base: ModelReader, experts: Sequence[ModelReader],
             out_dtypes: dict[str, Any]) -> list[Tensor]:
    """Merge.tensors: the floating tensors with elements, in order."""
    metas = [base.meta(n) for n in base.names]
    return [Tensor(m.name, m, tuple(e.meta(m.name) for e in experts), out_dtypes[m.name])
            for m in metas if m.dtype.is_floating_point and m.numel]


def _finish(unit: Unit, job: Future, writer: ShardedWriter,
            on_non_finite: Callable[[str], Exception], observe: Any) -> None:
    """Wait for a unit (its judgments to `observe` first); after a tensor's last unit, mark
    it filled."""
    bad, found = job.result()
    if found is not None:
        observe.judged(unit.name, found)
    if bad:
        raise on_non_finite(unit.name)
    if unit.last:
        writer.filled(unit.name)
