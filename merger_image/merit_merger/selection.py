"""Exact k-th largest value over a whole model, streamed: the FFG global threshold.

FFG keeps the top `density` fraction of ALL elements of an expert's saliency s = v * tau^2,
one threshold per model. A model does not fit in memory as one fp32 vector, so this is a
two-pass radix select on the IEEE-754 bits: for non-negative fp32 values the bit pattern,
read as an int32, orders exactly like the value. Pass 1 counts the high 16 bits of every
element (65,536 bins; 15 used since the sign is 0) and finds the bin holding the k-th largest
and its rank inside that bin; pass 2 counts the low 16 bits of the elements in that bin only
and pins the exact bit pattern. Memory: two histograms per expert; cost: two streaming passes
of the saliencies; result: bit-exact, identical to torch.topk over the concatenation.
"""

from __future__ import annotations

import torch

from .methods import keep_count  # noqa: F401 - its home was here

HI_BINS = 1 << 15  # sign bit is 0 for non-negative values
LO_BINS = 1 << 16


def _bits(values: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    # abs() turns -0.0 into +0.0; everything else is already non-negative (v >= 0, tau^2 >= 0);
    # `nonnegative`: the caller's fp32 values are +0.0 or more already (an abs() they took)
    if not (nonnegative and values.dtype == torch.float32):
        values = values.detach().float().abs()
    return values.reshape(-1).view(torch.int32)


def locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, rank within the bin, 1-based from the top) of the k-th largest counted value."""
    from_top = torch.flip(hist, dims=[0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    if pos >= hist.numel():
        raise ValueError(f"k={k} exceeds the {int(from_top[-1])} values counted")
    above = int(from_top[pos - 1]) if pos else 0
    return hist.numel() - 1 - pos, k - above


class KthLargest:
    """Streaming exact k-th largest of non-negative fp32 values; feed every value twice."""

    def __init__(self, k: int, *, nonnegative: bool = False) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.nonnegative = nonnegative  # values are fed as fp32 >= +0.0 (no abs needed)
        # pass 2's histogram is allocated by pass 2 and pass 1's dropped by end_first, so
        # selectors kept between the passes (one per tensor and expert for TIES) hold ints
        self.hi: torch.Tensor | None = torch.zeros(HI_BINS, dtype=torch.int64)
        self.lo: torch.Tensor | None = None
        self._bin: int | None = None
        self._rank: int | None = None

    def add_first(self, values: torch.Tensor) -> None:
        """Pass 1: count the high 16 bits (on the values' device: only counts move)."""
        counts = torch.bincount(_bits(values, self.nonnegative) >> 16, minlength=HI_BINS)
        self.hi = self.hi.to(counts.device).add_(counts)

    def end_first(self) -> None:
        self._bin, self._rank = locate(self.hi.cpu(), self.k)
        self.hi = None

    def add_second(self, values: torch.Tensor) -> None:
        """Pass 2: count the low 16 bits of the values in the chosen high bin."""
        bits = _bits(values, self.nonnegative)
        chosen = bits[(bits >> 16) == self._bin] & 0xFFFF
        if chosen.numel():
            counts = torch.bincount(chosen, minlength=LO_BINS)
            self.lo = counts if self.lo is None else self.lo.to(counts.device).add_(counts)

    def result(self) -> float:
        """The k-th largest value (call after both passes)."""
        lo = self.lo if self.lo is not None else torch.zeros(LO_BINS, dtype=torch.int64)
        low, _ = locate(lo.cpu(), self._rank)
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])
