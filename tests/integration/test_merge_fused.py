"""The fused merge pass (numba kernels) against the torch pass, bit for bit.

The same merge runs twice on a tiny model, once through each pass (the torch pass forced by
making `fusedmerge.unsupported` give a reason); the output shards must be byte-identical, for
bf16, fp16 and fp32 inputs and outputs, token-weighted, uniform and task arithmetic (both of
its programs). Tensor sizes are chosen so the kernels' chunks and the units leave tails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.experts import save_state

from merit_merger import fusedmerge
from merit_merger.engine import MergeOutputError, merge_models
from merit_merger.sources import PartitionSource

SHAPES = {"embed.weight": (1031, 67), "layer.weight": (96, 64), "layer.bias": (97,),
          "scale": ()}


def write_models(root: Path, dtypes: list[torch.dtype], *, nan_in: int | None = None,
                 big: bool = False) -> tuple[Path, list[PartitionSource]]:
    """A base (dtypes[0]) and experts (dtypes[1:]) with an int buffer beside the floats."""
    g = torch.Generator().manual_seed(len(dtypes))
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    save_state(root / "base", {**{n: t.to(dtypes[0]) for n, t in base.items()},
                               "positions": torch.arange(7)}, shard_bytes=100_000)
    parts = []
    for k, dtype in enumerate(dtypes[1:]):
        state = {n: (t + 0.01 * (k + 1) * torch.randn(t.shape, generator=g)).to(dtype)
                 for n, t in base.items()}
        if big:
            state["layer.weight"][0, 0] = 60000.0
        if nan_in == k:
            state["layer.bias"][3] = float("nan")
        save_state(root / f"e{k}", {**state, "positions": torch.arange(7)})
        parts.append(PartitionSource(f"e{k}", root / f"e{k}", 1000 * (k + 1)))
    return root / "base", parts


def run(base: Path, parts, out: Path, method: str, *, torch_pass: bool, monkeypatch,
        **kwargs):
    with monkeypatch.context() as m:
        if torch_pass:
            m.setattr(fusedmerge, "unsupported", lambda *a, **k: "forced by the test")
        # blocks (the fused pass's units) of 1000 elements: tensors cut, with tails
        return merge_models(base_dir=base, partitions=parts, method=method, out_dir=out,
                            shard_size_bytes=60_000, chunk_elements=1000, **kwargs)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("dtypes,output", [
    ([BF16] * 4, None), ([F16] * 4, None), ([F32] * 4, None),
    ([F32, BF16, BF16, BF16], BF16), ([BF16, F16, F32], F16), ([BF16] * 3, F32),
])
@pytest.mark.parametrize("method,params", [
    ("token-weighted", {}), ("uniform", {}), ("task-arithmetic", {"scale": 0.3}),
    ("task-arithmetic", {"scale": 1.0}),
])
def test_fused_pass_equals_the_torch_pass_bit_for_bit(tmp_path, monkeypatch, dtypes, output,
                                                       method, params):
    base, parts = write_models(tmp_path, dtypes)
    fused = run(base, parts, tmp_path / "fused", method, params=params, output_dtype=output,
                torch_pass=False, monkeypatch=monkeypatch)
    plain = run(base, parts, tmp_path / "torch", method, params=params, output_dtype=output,
                torch_pass=True, monkeypatch=monkeypatch)
    assert (fused.kernel, plain.kernel) == ("fused", "torch")
    got, want = shard_bytes(tmp_path / "fused"), shard_bytes(tmp_path / "torch")
    assert len(got) > 1 and got == want
    assert fused.bytes_written == plain.bytes_written
    assert fused.bytes_read == plain.bytes_read
    assert fused.tensor_stats == plain.tensor_stats


@pytest.mark.parametrize("dtype,case", [(BF16, "nan"), (F16, "nan"), (F32, "nan"),
                                        (F16, "overflow")])
@pytest.mark.parametrize("torch_pass", [False, True])
def test_a_non_finite_output_is_refused_by_both_passes(tmp_path, monkeypatch, dtype, case,
                                                       torch_pass):
    """A NaN in an expert, or a sum beyond fp16's range (60000 x 2 experts, task
    arithmetic), fails the merge naming the tensor, and leaves no shard behind."""
    base, parts = write_models(tmp_path, [dtype] * 3, nan_in=1 if case == "nan" else None,
                               big=case == "overflow")
    method, params = (("token-weighted", {}) if case == "nan"
                      else ("task-arithmetic", {"scale": 1.0}))
    want = "layer.bias" if case == "nan" else "layer.weight"
    with pytest.raises(MergeOutputError, match=want):
        run(base, parts, tmp_path / "out", method, params=params, torch_pass=torch_pass,
            monkeypatch=monkeypatch)
    assert not list((tmp_path / "out").glob("*safetensors*"))
    assert not list((tmp_path / "out").glob(".*"))


def test_the_torch_pass_is_kept_for_what_the_kernels_do_not_cover(tmp_path):
    base, parts = write_models(tmp_path, [BF16] * 3)
    result = merge_models(base_dir=base, partitions=parts, method="dare",
                          params={"density": 0.5}, out_dir=tmp_path / "dare",
                          shard_size_bytes=10**9)
    assert result.kernel == "torch"
    from merit_merger.io import ModelReader

    reader = ModelReader(base)
    assert fusedmerge.unsupported("token-weighted", reader, [ModelReader(p.model_dir)
                                                             for p in parts],
                                  device="cpu", output_dtype=None) is None
    assert fusedmerge.unsupported("token-weighted", reader, [None], device="cpu",
                                  output_dtype=None) == "a LoRA partition"
    # a device without fused kernels (cuda's: test_merge_gpu_fused.py)
    assert fusedmerge.unsupported("token-weighted", reader, [reader], device="mps",
                                  output_dtype=None) == "the merge runs on mps"
