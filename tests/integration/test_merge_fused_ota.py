"""OTA through the fused kernels (`fusedota`) against the torch pass.

The same merge runs twice on a tiny model with real second-moment files, once through each
pass (the torch pass forced by making `fusedmerge.unsupported` give a reason), and the
output shards are compared. Rank-1 files (2-D and 3-D tensors factored, 1-D and scalar ones
stored) and `full` files (every moment stored); a tensor whose moments are all zero (with
epsilon 0 its weights sum to 0: the base is taken). Units of 1000 elements leave tails and
cross rows (67 and 63 columns).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.experts import make_experts, refresh_manifest, save_state

from merit_merger import fusedmerge, fusedota
from merit_merger.cli_merge import main as merge_main
from merit_merger.engine import MergeOutputError, merge_models
from merit_merger.methods import get_method
from merit_merger.moments import FACTORS, MomentReader, MomentsFormatError
from merit_merger.sources import PartitionSource
from merit_trainer.moments import load_second_moments, save_second_moments, write_moment_file

SHAPES = {"embed.weight": (1031, 67), "layer.weight": (5, 7, 9), "quiet.weight": (40, 63),
          "layer.bias": (97,), "scale": ()}
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def write_models(root: Path, dtypes: list[torch.dtype], *, kind: str = "rank1",
                 nan_in: int | None = None) -> tuple[Path, list[PartitionSource]]:
    """A base (dtypes[0]) and experts (dtypes[1:]) with second moments over orders of
    magnitude; quiet.weight never had a gradient (v = 0)."""
    g = torch.Generator().manual_seed(len(dtypes))
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    save_state(root / "base", {**{n: t.to(dtypes[0]) for n, t in base.items()},
                               "positions": torch.arange(7)}, shard_bytes=100_000)
    parts = []
    for k, dtype in enumerate(dtypes[1:]):
        state = {n: (t + 0.01 * (k + 1) * torch.randn(t.shape, generator=g)).to(dtype)
                 for n, t in base.items()}
        if nan_in == k:
            state["layer.bias"][3] = float("nan")
        save_state(root / f"e{k}", {**state, "positions": torch.arange(7)})
        v = {n: torch.exp(torch.randn(s, generator=g) * 2 - 12) for n, s in SHAPES.items()}
        v["quiet.weight"].zero_()
        moments = save_second_moments(root / f"v{k}.safetensors", v, kind=kind, beta2=0.999,
                                      step=10)
        parts.append(PartitionSource(f"e{k}", root / f"e{k}", 1000 * (k + 1), moments=moments))
    return root / "base", parts


def run(base: Path, parts, out: Path, *, torch_pass: bool, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        if torch_pass:
            m.setattr(fusedmerge, "unsupported", lambda *a, **k: "forced by the test")
        return merge_models(base_dir=base, partitions=parts, method="ota", out_dir=out,
                            shard_size_bytes=60_000, chunk_elements=1000, **kwargs)


def outputs(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t for p in sorted(out.glob("*.safetensors")) for n, t in load_file(p).items()}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def spoil_factor(path: Path, name: str, factor: str, value: float) -> None:
    """Rewrite a rank-1 moments file with one value of name's `factor` replaced."""
    _, entries, _ = load_second_moments(path)
    tensors = {}
    for n, e in entries.items():
        if isinstance(e, tuple):
            tensors |= {f"{n}::{f}": t.clone() for f, t in zip(FACTORS, e, strict=True)}
        else:
            tensors[n] = e
    tensors[f"{name}::{factor}"].view(-1)[0] = value
    write_moment_file(path, tensors, kind="rank1", beta2=0.999, step=10)


def both(tmp_path: Path, monkeypatch, dtypes, params, *, kind="rank1", output=None):
    base, parts = write_models(tmp_path, dtypes, kind=kind)
    fused = run(base, parts, tmp_path / "fused", params=params, output_dtype=output,
                torch_pass=False, monkeypatch=monkeypatch)
    plain = run(base, parts, tmp_path / "torch", params=params, output_dtype=output,
                torch_pass=True, monkeypatch=monkeypatch)
    assert (fused.kernel, plain.kernel) == ("fused", "torch")
    assert fused.bytes_written == plain.bytes_written
    assert fused.bytes_read == plain.bytes_read
    return fused, plain


@pytest.mark.parametrize("dtypes,output", [
    ([BF16] * 4, None), ([F16] * 4, None), ([F32] * 4, None), ([F32, BF16, BF16, BF16], BF16),
    ([BF16, F16, F32], F16), ([BF16] * 3, F32),
])
@pytest.mark.parametrize("kind", ["rank1", "full"])
@pytest.mark.parametrize("params", [{"power": 1.0}, {"power": 2.0, "epsilon": 1e-3},
                                    {"power": 3.0}, {"power": 1.0, "epsilon": 0.0}])
def test_fused_ota_equals_the_torch_pass_bit_for_bit(tmp_path, monkeypatch, dtypes, output,
                                                     kind, params):
    """p = 1, 2 and 3 (torch's shortcuts: a copy, x * x, x * x * x), epsilon 0 (the base
    where no expert has a weight: quiet.weight): the same bytes."""
    both(tmp_path, monkeypatch, dtypes, params, kind=kind, output=output)
    assert shard_bytes(tmp_path / "fused") == shard_bytes(tmp_path / "torch")
    if params.get("epsilon") == 0.0:
        base = outputs(tmp_path / "torch")["quiet.weight"]
        assert torch.equal(outputs(tmp_path / "fused")["quiet.weight"], base)


def assert_within_an_ulp(root: Path, dtype: torch.dtype) -> None:
    """The fused output (root/fused) against the torch pass's (root/torch): fp32 to 1e-6 of
    the largest |theta_k| of the three experts (root/e0..e2) at the element, 16-bit outputs
    to one ulp, other tensors equal."""
    got, want = outputs(root / "fused"), outputs(root / "torch")
    experts = [outputs(root / f"e{k}") for k in range(3)]
    assert got.keys() == want.keys()
    for name, w in want.items():
        if not w.is_floating_point():
            assert torch.equal(got[name], w)
        elif dtype == F32:
            scale = torch.stack([e[name].abs() for e in experts]).amax(0)
            assert bool(((got[name] - w).abs() <= 1e-6 * scale).all()), name
        else:
            ulps = (got[name].view(torch.int16).int() - w.view(torch.int16).int()).abs()
            assert int(ulps.max()) <= 1, name


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("kind", ["rank1", "full"])
@pytest.mark.parametrize("params", [{}, {"power": 0.3, "epsilon": 1e-30}, {"power": 1.7},
                                    {"epsilon": 0.0}])
def test_fused_ota_with_a_root_or_other_power_is_within_an_ulp(tmp_path, monkeypatch, dtype,
                                                                kind, params):
    """Not bit for bit. torch's CPU sqrt (p = 0.5, the default; MKL's vector math in this
    build) is within an ulp but not correctly rounded (measured: a fifth of random fp32
    values an ulp off numpy's IEEE sqrt), and a power other than 0.5, 1, 2, 3 is Sleef's pow
    there and powf here, each within an ulp. A weight an ulp apart moves the weighted mean by
    at most a few fp32 ulps of the largest input: fp32 outputs agree to 1e-6 of the largest
    |theta_k| at the element, 16-bit ones to one ulp (a sum across a rounding boundary)."""
    both(tmp_path, monkeypatch, [dtype] * 4, params, kind=kind)
    assert_within_an_ulp(tmp_path, dtype)


def test_mixed_moment_kinds_and_fp64_moments_are_left_to_the_torch_pass(tmp_path):
    """FFG masks (density) take the fused pass too (test_merge_fused_ffg). An fp64 moment file
    merges on the torch pass as its fp32 values do (fp32 -> fp64 -> fp32 is exact)."""
    base, parts = write_models(tmp_path / "rank1", [BF16] * 3)
    fused = merge_models(base_dir=base, partitions=parts, method="ota", out_dir=tmp_path / "a",
                         shard_size_bytes=10**9)
    ffg = merge_models(base_dir=base, partitions=parts, method="ota", out_dir=tmp_path / "b",
                       params={"density": 0.5}, shard_size_bytes=10**9)
    _, full = write_models(tmp_path / "full", [BF16] * 3, kind="full")
    mixed = merge_models(base_dir=base, partitions=[parts[0], full[1]], method="ota",
                         out_dir=tmp_path / "c", shard_size_bytes=10**9)
    assert (fused.kernel, ffg.kernel, mixed.kernel) == ("fused", "fused", "torch")
    v = load_second_moments(full[1].moments)[1]
    write_moment_file(full[1].moments, {n: t.double() for n, t in v.items()}, kind="full",
                      beta2=0.999, step=10)
    why = fusedota.unsupported(get_method("ota").parse_params({}),
                               [MomentReader(full[1].moments)])
    assert "a dtype the fused kernels do not take" in why
    wide = merge_models(base_dir=base, partitions=[parts[0], full[1]], method="ota",
                        out_dir=tmp_path / "d", shard_size_bytes=10**9)
    assert wide.kernel == "torch"
    assert shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "c")


@pytest.mark.parametrize("torch_pass", [False, True])
def test_a_non_finite_ota_output_is_refused_naming_the_tensor(tmp_path, monkeypatch,
                                                              torch_pass):
    base, parts = write_models(tmp_path, [BF16] * 3, nan_in=1)
    with pytest.raises(MergeOutputError, match="layer.bias"):
        run(base, parts, tmp_path / "out", torch_pass=torch_pass, monkeypatch=monkeypatch)
    assert not list((tmp_path / "out").glob("*safetensors*"))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("factor", ["row", "col", "total"])
def test_a_bad_rank1_factor_is_refused_as_the_moments_reader_refuses_it(tmp_path, monkeypatch,
                                                                        bad, factor):
    """The fused pass reads the factors itself (numpy) and checks them as
    MomentReader.check does, with its error; verification refuses the partition with it."""
    base, parts = write_models(tmp_path, [BF16] * 3)
    spoil_factor(parts[1].moments, "embed.weight", factor, bad)
    reader = MomentReader(parts[1].moments)
    with pytest.raises(MomentsFormatError) as want:
        reader.check("embed.weight", SHAPES["embed.weight"])
    with pytest.raises(MomentsFormatError) as got:
        merge_models(base_dir=base, partitions=parts, method="ota", out_dir=tmp_path / "out",
                     shard_size_bytes=10**9)
    assert str(got.value) == str(want.value)
    assert "embed.weight" in str(got.value)
    assert not list((tmp_path / "out").glob("*safetensors*"))


MERGE = """
import json, sys
from pathlib import Path
from merit_merger import fusedmerge, fusedota
from merit_merger.engine import merge_models
from merit_merger.sources import PartitionSource

fusedmerge.warm()
args = json.loads(sys.argv[1])
parts = [PartitionSource(n, Path(d), t, moments=Path(v)) for n, d, t, v in args["parts"]]
result = merge_models(base_dir=Path(args["base"]), partitions=parts, method="ota",
                      out_dir=Path(args["out"]), shard_size_bytes=10**9, threads=2)
kernels = (fusedota.merge_factored, fusedota.merge_stored, fusedota.power)
print(json.dumps({"kernel": result.kernel, "torch": "torch" in sys.modules,
                  "compiled": [len(k.signatures) for k in kernels]}))
"""


def test_a_fused_ota_merge_never_imports_torch_nor_compiles(tmp_path):
    """As test_merge_without_torch: the moments are read and raised to p with numpy. And
    the merge calls the kernels with the types warm() compiled them for (one signature
    each), so a merge never compiles."""
    assert merged_in_a_fresh_process(MERGE, tmp_path) == {
        "kernel": "fused", "torch": False, "compiled": [1, 1, 1]}


def merged_in_a_fresh_process(script: str, tmp_path: Path) -> dict:
    """What `script` (a merge of write_models' bf16 base and two experts with rank-1
    moments, given as JSON in argv[1]) prints last, as JSON, run in a fresh interpreter."""
    base, parts = write_models(tmp_path, [BF16] * 3)
    args = {"base": str(base), "out": str(tmp_path / "out"),
            "parts": [(p.name, str(p.model_dir), p.tokens, str(p.moments)) for p in parts]}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=os.environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_meritrun_merge_reports_the_fused_kernel_and_refuses_a_bad_moment_file(
        tiny_base, tmp_path, capsys):
    """Through `meritrun merge` (verification, then the merge): the report's io.kernel is
    fused; a partition whose rank-1 factor is negative is refused by verification
    (`second-moments`, as before the fused pass) and the others still merge fused."""
    ex = make_experts(tmp_path / "parts", tiny_base, 3)
    _, entries, _ = load_second_moments(ex.artifacts[1] / "optimizer_v.safetensors")
    name = next(n for n, e in entries.items() if isinstance(e, tuple))
    spoil_factor(ex.artifacts[1] / "optimizer_v.safetensors", name, "col", -1.0)
    refresh_manifest(ex.artifacts[1])
    out = tmp_path / "out"
    code = merge_main(["--method", "ota", "--quorum", "0.5", "--base", str(tiny_base), "--out",
                 str(out), *map(str, ex.artifacts)])
    capsys.readouterr()
    assert code == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["io"]["kernel"] == "fused"
    refused = {r["partition"]: r for r in report["refused"]}
    assert list(refused) == ["p1"] and refused["p1"]["check"] == "second-moments"
    assert "negative or not finite" in refused["p1"]["detail"]
