"""OTA with FFG masks (`density`) through the fused kernels (`fusedffg`) against the torch
pass.

The models and moment files of test_merge_fused_ota (rank-1: 2-D and 3-D tensors factored,
1-D and scalar ones stored; `full`: every moment stored; quiet.weight never had a gradient,
so its saliencies are all 0 and a threshold above 0 masks every expert there: the base is
taken). Units of 1000 elements cross rows. The thresholds (one per expert over the whole
model), each tensor's kept counts and fallbacks are equal exactly: the saliencies are IEEE
ops in the torch pass's order, and the radix select is exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.experts import make_experts
from test_merge_fused_ota import (
    BF16,
    F32,
    assert_within_an_ulp,
    merged_in_a_fresh_process,
    outputs,
    run,
    shard_bytes,
    write_models,
)

from merit_merger.cli_merge import main as merge_main


def both(tmp_path, monkeypatch, dtypes, params, kind):
    base, parts = write_models(tmp_path, dtypes, kind=kind)
    fused = run(base, parts, tmp_path / "fused", params=params, torch_pass=False,
                monkeypatch=monkeypatch)
    plain = run(base, parts, tmp_path / "torch", params=params, torch_pass=True,
                monkeypatch=monkeypatch)
    assert (fused.kernel, plain.kernel) == ("fused", "torch")
    assert fused.thresholds == plain.thresholds
    assert fused.tensor_stats == plain.tensor_stats
    assert (fused.bytes_read, fused.bytes_written) == (plain.bytes_read, plain.bytes_written)
    assert "prepass" in fused.seconds
    return fused, plain


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("kind", ["rank1", "full"])
@pytest.mark.parametrize("params", [{"density": 0.2, "power": 1.0},
                                    {"density": 0.35, "power": 2.0, "epsilon": 1e-3}])
def test_fused_ffg_equals_the_torch_pass_bit_for_bit(tmp_path, monkeypatch, dtype, kind,
                                                     params):
    """p = 1 and 2 (a copy, x * x): the same thresholds, kept counts, fallbacks and bytes.
    quiet.weight (v = 0) is masked in every expert: all of it falls back to the base."""
    fused, _ = both(tmp_path, monkeypatch, [dtype] * 4, params, kind)
    assert shard_bytes(tmp_path / "fused") == shard_bytes(tmp_path / "torch")
    quiet = fused.tensor_stats["quiet.weight"]
    assert quiet["fallback_elements"] == quiet["numel"] > 0
    assert all(f == 0 for f in quiet["kept_fraction"].values())
    base = outputs(tmp_path / "base")["quiet.weight"]
    assert torch.equal(outputs(tmp_path / "fused")["quiet.weight"], base)
    kept = sum(f * fused.tensor_stats[n]["numel"] for n in fused.tensor_stats
               for f in fused.tensor_stats[n].get("kept_fraction", {}).values())
    numel = sum(s["numel"] for s in fused.tensor_stats.values())
    assert 0 < kept < 3 * numel  # the masks keep some and drop some


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("kind", ["rank1", "full"])
def test_fused_ffg_with_a_root_is_within_an_ulp(tmp_path, monkeypatch, dtype, kind):
    """p = 0.5 (the default): the masks are equal (thresholds, kept counts, fallbacks), the
    weights an ulp apart where torch's CPU sqrt (MKL's) is not correctly rounded, as in
    test_merge_fused_ota: fp32 outputs to 1e-6 of the largest |theta_k|, bf16 to one ulp."""
    both(tmp_path, monkeypatch, [dtype] * 4, {"density": 0.3}, kind)
    assert_within_an_ulp(tmp_path, dtype)


def test_density_one_keeps_every_element(tmp_path, monkeypatch):
    """density 1: k = N, the threshold is the smallest saliency (0, quiet.weight's), ties at
    it kept: every mask keeps everything, nothing falls back."""
    fused, _ = both(tmp_path, monkeypatch, [BF16] * 3, {"density": 1.0, "power": 1.0},
                    "rank1")
    assert set(fused.thresholds.values()) == {0.0}
    for stats in fused.tensor_stats.values():
        assert stats["fallback_elements"] == 0
        assert set(stats["kept_fraction"].values()) == {1.0}


MERGE = """
import json, sys
from pathlib import Path
from merit_merger import fusedffg, fusedmerge
from merit_merger.engine import merge_models
from merit_merger.sources import PartitionSource

fusedmerge.warm()
args = json.loads(sys.argv[1])
parts = [PartitionSource(n, Path(d), t, moments=Path(v)) for n, d, t, v in args["parts"]]
result = merge_models(base_dir=Path(args["base"]), partitions=parts, method="ota",
                      out_dir=Path(args["out"]), shard_size_bytes=10**9, threads=2,
                      params={"density": 0.25})
kernels = (fusedffg.count_saliency, fusedffg.merge_masked)
print(json.dumps({"kernel": result.kernel, "torch": "torch" in sys.modules,
                  "compiled": [len(k.signatures) for k in kernels],
                  "thresholds": len(result.thresholds)}))
"""


def test_a_fused_ffg_merge_never_imports_torch_nor_compiles(tmp_path):
    """As test_merge_without_torch; and the kernels are called with the types warm()
    compiled them for (count_saliency: one; merge_masked: factored and stored moments share
    one signature), so a merge never compiles."""
    assert merged_in_a_fresh_process(MERGE, tmp_path) == {
        "kernel": "fused", "torch": False, "compiled": [1, 1], "thresholds": 2}


def test_meritrun_merge_with_density_reports_the_fused_kernel(tiny_base, tmp_path, capsys):
    """Through `meritrun merge --method ota --density`: the report's io.kernel is fused and
    it gives each partition's FFG threshold and the layers' kept fractions."""
    ex = make_experts(tmp_path / "parts", tiny_base, 2)
    out = tmp_path / "out"
    code = merge_main(["--method", "ota", "--density", "0.3", "--base", str(tiny_base),
                       "--out", str(out), *map(str, ex.artifacts)])
    capsys.readouterr()
    assert code == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["io"]["kernel"] == "fused"
    text = json.dumps(report)
    assert "ffg_threshold" in text and "kept_fraction" in text
