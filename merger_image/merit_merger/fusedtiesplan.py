"""TIES in the fused pass: per tensor, how its trim thresholds are found before its merge.

`fusedmerge` asks `prepare(merge)` for each tensor's plan; the kernels are `fusedties`'.
A tensor's thresholds are found just before its units are merged (the torch pre-pass, a
pass over the whole model before the merge, is skipped):
- a tensor of one unit: inside the unit's kernel (`ties_whole`), read once;
- a tensor of at most HOLD_BLOCKS of the engine's blocks: held in memory as stored
  (`Merge.hold`), pass 1 counted as each unit is read in, pass 2 from memory, merged from
  memory: read once;
- a larger one: two scans of its inputs (`Merge.scan`), then the merge: read three times
  (at 1B, K = 4 only the embedding; 12.7 GB read in all, against 29.8 GB with every tensor
  scanned); when its inputs come from storage, held instead on a mapped scratch file
  (`Merge.spill`), so each byte is fetched once, not three times.
Each pool thread counts into its own histograms (`Tally`), summed once a pass is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from .fusedplan import Kernel, Merge, Plan, Tensor
from .fusedties import (
    HI_BINS,
    LO_BINS,
    count_high,
    count_low,
    locate,
    threshold,
    ties_range,
    ties_whole,
)
from .methods import keep_count

# A tensor of at most HOLD_BLOCKS of the engine's blocks (the torch pre-pass's rule, which
# keeps such a tensor's K fp32 saliencies) has its K + 1 inputs held in memory as stored
# while its thresholds are counted and it is merged, so it is read once, not three times
# (1B parameters, K = 4: every tensor but the embedding; 12.7 GB read instead of 29.8). At
# most HELD tensors are held at once (one counted while the one before is merged): at most
# HELD x (K + 1) x HOLD_BLOCKS x block x itemsize (100 MB for K = 4 bf16, 1M-element blocks).
HOLD_BLOCKS = 5
HELD = 2


class Tally:
    """One count's histograms, one per pool thread (each thread adds to its own, no lock
    per unit), summed once the count is done. A thread reuses its array count after count,
    zeroed when a new count first reaches it: a merge's counts run one after another (a
    scan returns only when its units are done, and the plan reads the total before the
    next scan starts)."""

    def __init__(self, local: threading.local, shape: tuple[int, int]) -> None:
        self.local, self.shape = local, shape
        self.arrays: list[np.ndarray] = []
        self.lock = threading.Lock()

    def mine(self) -> np.ndarray:
        slots = self.local.__dict__.setdefault("slots", {})
        owner, array = slots.get(self.shape, (None, None))
        if owner is not self:
            if array is None:
                array = np.zeros(self.shape, np.int64)
            else:
                array.fill(0)
            slots[self.shape] = (self, array)
            with self.lock:
                self.arrays.append(array)
        return array

    def total(self) -> np.ndarray:
        return np.sum(self.arrays, axis=0) if self.arrays else np.zeros(self.shape, np.int64)


Scan = Callable[[Callable[[np.ndarray, int, int], None]], object]


def streamed_thresholds(first: Scan, second: Scan, k_count: int, codes: np.ndarray,
                        keep: int, local: threading.local) -> np.ndarray:
    """Each expert's keep-th largest |tau| over a tensor of many units (fp32, one per
    expert): two scans of its experts and base (first(kernel), second(kernel): the kernel
    on every unit, read or held, on the pool; Merge.scan's or Merge.hold's), pass 1's
    histograms between them."""
    high = Tally(local, (k_count, HI_BINS))
    first(lambda a, lo, hi: count_high(a[:k_count + 1], codes, lo, hi, high.mine()))
    total = high.total()
    bins, ranks = np.empty(k_count, np.int64), np.empty(k_count, np.int64)
    for k in range(k_count):
        bins[k], ranks[k] = locate(total[k], keep)
    low = Tally(local, (k_count, LO_BINS))
    second(lambda a, lo, hi: count_low(a[:k_count + 1], codes, lo, hi, bins, low.mine()))
    total = low.total()
    return np.asarray([threshold(int(bins[k]), int(locate(total[k], int(ranks[k]))[0]))
                       for k in range(k_count)], np.float32)


class _Spares:
    """The held tensors' arrays: at most HELD sets in use (`take` waits for a tensor being
    merged to give its set back), and a set given back is reused by the next tensor held: a
    fresh array of tens of MB costs a page fault and the zeroing of each 4 KiB page on first
    touch (7% of the samples of a 1B merge, when every held tensor had new arrays)."""

    def __init__(self) -> None:
        self.free: list[list[np.ndarray]] = []
        self.slots = threading.Semaphore(HELD)

    def take(self, sizes: list[int]) -> list[np.ndarray]:
        """A set of arrays of at least `sizes` bytes each (reused, or new: a smaller set is
        dropped). Waits for a slot: the units of the tensors holding them are all queued
        on the pool before the next plan is made, so a slot comes free."""
        self.slots.acquire()
        while self.free:
            arrays = self.free.pop()
            if all(a.size >= n for a, n in zip(arrays, sizes, strict=True)):
                return arrays
        return [np.empty(n, np.uint8) for n in sizes]

    def give(self, arrays: list[np.ndarray]) -> None:
        """A tensor's set back (all its units merged, or a failure: the slot is freed)."""
        self.free.append(arrays)
        self.slots.release()


def _plan(codes: np.ndarray, thresholds: np.ndarray, scale: np.float32,
          held: list[np.ndarray] | None = None, numel: int = 0,
          done: Callable[[], None] | None = None) -> Plan:
    """The merge of a tensor's units given its thresholds (inputs read by the units, or
    held: the kernel puts their arrays' addresses in, and calls `done` once all `numel`
    elements are merged)."""
    if held is None:
        def kernel(addresses: np.ndarray, lo: int, hi: int) -> bool:
            return ties_range(addresses, codes, thresholds, scale, lo, hi)
        return Plan(kernel, reads_base=True)
    inputs = np.array([a.ctypes.data for a in held], np.int64)
    merged, lock = [0], threading.Lock()

    def from_held(addresses: np.ndarray, lo: int, hi: int, held: list = held) -> bool:
        addresses = addresses.copy()  # `held` in the closure keeps the arrays alive
        addresses[:len(inputs)] = inputs
        try:
            return ties_range(addresses, codes, thresholds, scale, lo, hi)
        finally:  # a unit that fails is done too: the set goes back whatever happened
            with lock:
                merged[0] += hi - lo
                last = merged[0] == numel
            if last and done is not None:
                done()
    return Plan(from_held, reads_base=True, held=True, held_at=inputs)


def prepare(merge: Merge) -> Callable[[Tensor], Plan]:
    """fusedmerge's FusedMethod.prepare for TIES: each tensor's plan, its thresholds found
    first: in its one unit's kernel; from the tensor held in memory when it has at most
    HOLD_BLOCKS blocks (read once for the counts and the merge); else by two scans before
    the merge's (each input read three times), or held on a scratch file when read from
    storage (fetched once)."""
    density = float(merge.params.density)
    scale = np.float32(merge.params.scale)  # torch rounds the Python scalar to fp32 too
    local = threading.local()  # the pool threads' histograms
    spares = _Spares()

    def plan(t: Tensor) -> Plan:
        numel, codes, inputs = t.base.numel, t.codes(), len(t.experts) + 1
        keep = keep_count(numel, density) if density < 1 else 0
        if keep and numel <= merge.unit_elements:
            def whole(addresses: np.ndarray, lo: int, hi: int) -> bool:
                return ties_whole(addresses, codes, keep, scale, numel)
            return Plan(whole, reads_base=True)
        if not keep:  # density 1: a threshold of 0 trims nothing
            return _plan(codes, np.zeros(inputs - 1, np.float32), scale)
        sizes = [m.nbytes for m in (*t.experts, t.base)]
        large = numel > HOLD_BLOCKS * merge.block_elements
        if large and merge.spill is None:
            def scan(kernel: Kernel) -> None:
                merge.scan(t, kernel)
            return _plan(codes, streamed_thresholds(scan, scan, inputs - 1, codes[:inputs],
                                                    keep, local), scale)
        arrays = merge.spill(sizes) if large else spares.take(sizes)
        held: list[np.ndarray] = []

        def read(kernel: Kernel) -> None:  # pass 1 as the units are read in
            held.extend(merge.hold(t, arrays, kernel))

        def again(kernel: Kernel) -> None:
            merge.scan(t, kernel, held)
        thresholds = streamed_thresholds(read, again, inputs - 1, codes[:inputs], keep, local)
        return _plan(codes, thresholds, scale, held, numel,
                     None if large else lambda: spares.give(arrays))

    return plan
