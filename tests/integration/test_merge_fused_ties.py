"""TIES through the fused pass (fusedties, fusedtiesplan) against the torch pass, bit for bit.

The same merge runs through each pass (the torch pass forced by making
`fusedmerge.unsupported` give a reason) on a tiny model cut into units of 1000 elements:
tensors of many units with tails (their thresholds found by two scans), tensors of one unit
(thresholds from the held unit), a tensor of quantised updates on a zero base (equal
magnitudes at the threshold everywhere, and experts cancelling to a sum of exactly 0, where
the elected sign is +1). The output shards must be byte-identical for bf16, fp16 and fp32
inputs and outputs, at density < 1 and density 1 (nothing trimmed), with the tensors of many
units held in memory (read once) and streamed (read by two scans, then merged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.experts import save_state

from merit_merger import fused, fusedmerge, fusedties, fusedtiesplan
from merit_merger.engine import MergeOutputError, merge_models
from merit_merger.methods.ties import trim_thresholds
from merit_merger.selection import KthLargest, keep_count
from merit_merger.sources import PartitionSource

SHAPES = {"embed.weight": (1031, 67), "layer.weight": (96, 64), "layer.bias": (97,),
          "scale": ()}
QUANTISED = "quantised.weight"  # (41, 50): 3 units, zero base, updates in {-3..3} / 4
UNIT = 1000
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def write_models(root: Path, dtypes: list[torch.dtype], *, nan_in: int | None = None,
                 big: bool = False) -> tuple[Path, list[PartitionSource]]:
    """A base (dtypes[0]) and experts (dtypes[1:]), an int buffer beside the floats."""
    g = torch.Generator().manual_seed(len(dtypes))
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    base[QUANTISED] = torch.zeros(41, 50)
    save_state(root / "base", {**{n: t.to(dtypes[0]) for n, t in base.items()},
                               "positions": torch.arange(7)}, shard_bytes=100_000)
    steps = torch.randint(-3, 4, (41, 50), generator=g) / 4
    parts = []
    for k, dtype in enumerate(dtypes[1:]):
        state = {n: (t + 0.01 * (k + 1) * torch.randn(t.shape, generator=g)).to(dtype)
                 for n, t in base.items()}
        # expert 1 undoes expert 0 where both keep it: their sum is exactly 0 there
        state[QUANTISED] = (-steps if k == 1 else steps.roll(k, 0) if k else steps).to(dtype)
        if big:
            state["layer.weight"][0, 0] = 60000.0
        if nan_in == k:
            state["embed.weight"][500, 3] = float("nan")
        save_state(root / f"e{k}", {**state, "positions": torch.arange(7)})
        parts.append(PartitionSource(f"e{k}", root / f"e{k}", 1000 * (k + 1)))
    return root / "base", parts


def run(base: Path, parts, out: Path, *, torch_pass: bool, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        if torch_pass:
            m.setattr(fusedmerge, "unsupported", lambda *a, **k: "forced by the test")
        return merge_models(base_dir=base, partitions=parts, method="ties", out_dir=out,
                            shard_size_bytes=60_000, chunk_elements=UNIT, **kwargs)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("dtypes,output", [
    ([BF16] * 4, None), ([F16] * 4, None), ([F32] * 4, None),
    ([F32, BF16, BF16, BF16], BF16), ([BF16, F16, F32], F16), ([BF16] * 3, F32),
    ([BF16] * 2, None),  # one expert: pass 1's pairs of experts leave it alone
])
@pytest.mark.parametrize("params,hold", [
    ({"density": 0.3, "scale": 0.7}, True), ({"density": 0.3, "scale": 0.7}, False),
    ({"density": 0.2}, True), ({"density": 0.2}, False), ({"density": 1.0, "scale": 1.3}, True),
])
def test_fused_ties_equals_the_torch_pass_bit_for_bit(tmp_path, monkeypatch, dtypes, output,
                                                      params, hold):
    monkeypatch.setattr(fusedtiesplan, "HOLD_BLOCKS", 100 if hold else 0)  # all held, or none
    base, parts = write_models(tmp_path, dtypes)
    fused_run = run(base, parts, tmp_path / "fused", params=params, output_dtype=output,
                    torch_pass=False, monkeypatch=monkeypatch)
    plain = run(base, parts, tmp_path / "torch", params=params, output_dtype=output,
                torch_pass=True, monkeypatch=monkeypatch)
    assert (fused_run.kernel, plain.kernel) == ("fused", "torch")
    got, want = shard_bytes(tmp_path / "fused"), shard_bytes(tmp_path / "torch")
    assert len(got) > 1 and got == want
    assert fused_run.bytes_written == plain.bytes_written
    assert fused_run.tensor_stats == plain.tensor_stats
    # what the fused pass reads: a tensor of many units three times (two scans, the merge)
    # when it is trimmed and not held, any other once; the int buffer once
    k = len(parts)
    trimmed = params["density"] < 1
    reads = sum((k + 1) * (3 if trimmed and not hold and t.numel() > UNIT else 1)
                * t.numel() * dtypes[0].itemsize for t in [torch.empty(s) for s in
                                                           [*SHAPES.values(), (41, 50)]])
    if len(set(dtypes)) == 1:
        assert fused_run.bytes_read == reads + 7 * 8
    assert ("prepass" in fused_run.seconds) == trimmed


def test_the_quantised_tensor_has_ties_at_its_thresholds_and_cancelling_sums(tmp_path):
    """The case the equality test leans on is really there: many equal magnitudes at each
    expert's threshold, and elements where the trimmed updates sum to exactly 0."""
    base, parts = write_models(tmp_path, [BF16] * 4)
    from support.experts import load_state

    experts = [load_state(p.model_dir)[QUANTISED].float() for p in parts]
    thresholds = trim_thresholds(torch.zeros(41, 50), experts, 0.3)
    for e, t in zip(experts, thresholds, strict=True):
        assert (e.abs() == t).sum() > 100
    trimmed = [e.masked_fill(e.abs() < t, 0) for e, t in zip(experts, thresholds, strict=True)]
    total = sum(trimmed)
    assert ((total == 0) & (trimmed[0] != 0)).sum() > 10


@pytest.mark.parametrize("dtype,case", [(BF16, "nan"), (F16, "nan"), (F32, "nan"),
                                        (F16, "overflow")])
@pytest.mark.parametrize("torch_pass,hold", [(False, False), (False, True), (True, False)])
def test_a_non_finite_output_is_refused_by_both_passes(tmp_path, monkeypatch, dtype, case,
                                                       torch_pass, hold):
    """A NaN in an expert's tensor of many units (kept by the trim: NaN's bits rank above
    every magnitude), or a mean beyond fp16's range (60000 x lambda 2), fails the merge
    naming the tensor and leaves no shard behind (the tensor streamed or held: a held
    tensor's failed unit still gives its arrays back, so nothing waits for them)."""
    monkeypatch.setattr(fusedtiesplan, "HOLD_BLOCKS", 100 if hold else 0)
    base, parts = write_models(tmp_path, [dtype] * 3, nan_in=1 if case == "nan" else None,
                               big=case == "overflow")
    want = "embed.weight" if case == "nan" else "layer.weight"
    with pytest.raises(MergeOutputError, match=want):
        run(base, parts, tmp_path / "out", params={"density": 0.3, "scale": 2.0},
            torch_pass=torch_pass, monkeypatch=monkeypatch)
    assert not list((tmp_path / "out").glob("*safetensors*"))
    assert not list((tmp_path / "out").glob(".*"))


def _arrays(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and 3 experts; bf16 makes equal magnitudes common; zeros, -0.0 and an
    unchanged expert (every |tau| 0) included."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    experts = [(base.float() + torch.randn(n, generator=g) * 1e-3 * (k + 1)).to(dtype)
               for k in range(2)]
    experts[0][: n // 4] = base[: n // 4]
    experts[1][: n // 8] = -0.0
    return base, [*experts, base.clone()]


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("n,density", [(1, 0.2), (777, 0.3), (20_000, 0.2), (20_000, 0.9)])
def test_thresholds_equal_the_torch_pre_pass(dtype, n, density):
    """Both fused selections (held in one unit, and streamed over units of 3000 with the
    per-thread tallies) give each expert's keep-th largest |tau| exactly as `kthvalue` and
    the torch pre-pass's radix select (`KthLargest`) do."""
    base, experts = _arrays(dtype, n, seed=n)
    keep = keep_count(n, density)
    want = trim_thresholds(base, experts, density)
    for i, e in enumerate(experts):
        sel = KthLargest(keep, nonnegative=True)
        tau = (e.float() - base.float()).abs_()
        sel.add_first(tau)
        sel.end_first()
        sel.add_second(tau)
        assert sel.result() == want[i]
    arrays = [*experts, base]
    addresses = np.array([a.data_ptr() for a in arrays], np.int64)
    code = fused.CODES[{BF16: "BF16", F16: "F16", F32: "F32"}[dtype]]
    codes = np.full(len(arrays), code, np.int64)
    held = np.zeros(len(experts), np.float32)
    fusedties.held_thresholds(addresses, codes, n, keep, held)
    assert held.tolist() == want

    def scan(kernel):  # units of 3000 in reverse order, as a pool might finish them
        for lo in reversed(range(0, n, 3000)):
            kernel(addresses, lo, min(lo + 3000, n))

    import threading

    streamed = fusedtiesplan.streamed_thresholds(scan, scan, len(experts), codes, keep,
                                             threading.local())
    assert streamed.tolist() == want
