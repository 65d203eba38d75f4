"""Whole merges through the fused pass's GPU units (`gpuunits`) against the CPU fused pass.

`merge_models(device="cuda")` takes the fused pass with each unit's kernel on the GPU: the
units' inputs copied to the device, the Triton kernel, the output copied back. Without a GPU
the same path runs with its device buffers on the CPU and the kernels in Triton's
interpreter (`gpuunits.DEVICE = "cpu"`), and its output shards must equal the CPU fused
pass's byte for byte; on a GPU the outputs are held to 1e-6 of the largest input (fp32) or
an ulp (16-bit), as `gpukernels` explains. Which pass ran is in the result (`kernel`).
"""

from __future__ import annotations

import sys

from support.triton_interpreter import interpret

INTERPRETED = interpret()  # before triton is imported

import pytest  # noqa: E402
import test_merge_fused as linear_models  # noqa: E402
import test_merge_fused_ota as ota_models  # noqa: E402
import torch  # noqa: E402

import merit_merger  # noqa: E402
from merit_merger import fusedmerge, gpuunits  # noqa: E402
from merit_merger.engine import MergeOutputError, merge_models  # noqa: E402
from merit_merger.io import ModelReader  # noqa: E402
from merit_merger.methods import get_method  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def gpu(monkeypatch):
    """The GPU units' device: the CPU in the interpreter where no GPU is present."""
    if INTERPRETED:
        monkeypatch.setattr(gpuunits, "DEVICE", "cpu")


def merge(base, parts, out, method: str, device: str, **kwargs):
    return merge_models(base_dir=base, partitions=parts, method=method, out_dir=out,
                        shard_size_bytes=60_000, chunk_elements=1000, device=device, **kwargs)


def assert_same(tmp_path, dtype) -> None:
    got = linear_models.shard_bytes(tmp_path / "gpu")
    want = linear_models.shard_bytes(tmp_path / "cpu")
    assert len(got) > 1 and got.keys() == want.keys()
    if INTERPRETED:
        assert got == want
        return
    outs = ota_models.outputs(tmp_path / "gpu"), ota_models.outputs(tmp_path / "cpu")
    for name, want_t in outs[1].items():
        a, b = outs[0][name].double(), want_t.double()
        bound = 1e-6 if dtype == F32 else (2 ** -7 if dtype == BF16 else 2 ** -10)
        assert ((a - b).abs() <= bound * b.abs().max().clamp(min=1e-30)).all(), name


@pytest.mark.parametrize("dtypes,output", [([BF16] * 4, None), ([F32, BF16, F16, F32], F16)])
@pytest.mark.parametrize("method,params", [("token-weighted", {}),
                                           ("task-arithmetic", {"scale": 0.3})])
def test_linear_merges_on_the_gpu_units_equal_the_cpu_fused_pass(tmp_path, dtypes, output,
                                                                  method, params):
    base, parts = linear_models.write_models(tmp_path, dtypes)
    on_gpu = merge(base, parts, tmp_path / "gpu", method, "cuda", params=params,
                   output_dtype=output)
    on_cpu = merge(base, parts, tmp_path / "cpu", method, "cpu", params=params,
                   output_dtype=output)
    assert (on_gpu.kernel, on_cpu.kernel) == ("fused-gpu", "fused")
    assert (on_gpu.bytes_read, on_gpu.bytes_written) == (on_cpu.bytes_read,
                                                         on_cpu.bytes_written)
    assert_same(tmp_path, output or dtypes[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # masked lanes
@pytest.mark.parametrize("kind", ["rank1", "full"])
@pytest.mark.parametrize("params", [{}, {"power": 1.0, "epsilon": 0.0}])
def test_ota_on_the_gpu_units_equals_the_cpu_fused_pass(tmp_path, kind, params):
    """Rank-1 (factors on the device; 1-D tensors' stored moments) and stored moments; p =
    0.5 (the default), and p = 1 with epsilon 0 (the base where no expert weighs)."""
    base, parts = ota_models.write_models(tmp_path, [BF16] * 4, kind=kind)
    on_gpu = merge(base, parts, tmp_path / "gpu", "ota", "cuda", params=params)
    on_cpu = merge(base, parts, tmp_path / "cpu", "ota", "cpu", params=params)
    assert (on_gpu.kernel, on_cpu.kernel) == ("fused-gpu", "fused")
    assert on_gpu.bytes_read == on_cpu.bytes_read
    assert_same(tmp_path, BF16)


def test_a_non_finite_output_on_the_gpu_units_is_refused_naming_the_tensor(tmp_path):
    base, parts = linear_models.write_models(tmp_path, [BF16] * 3, nan_in=1)
    with pytest.raises(MergeOutputError, match="layer.bias"):
        merge(base, parts, tmp_path / "gpu", "token-weighted", "cuda")
    assert not list((tmp_path / "gpu").glob("*.safetensors"))


def why_not(base, parts, method: str, params: dict) -> str | None:
    impl = get_method(method)
    return fusedmerge.unsupported(
        method, ModelReader(base), [ModelReader(p.model_dir) for p in parts], device="cuda",
        output_dtype=None, params=impl.parse_params(params))


def test_what_the_gpu_kernels_do_not_cover_keeps_the_torch_pass_with_the_reason(
        tmp_path, monkeypatch):
    base, parts = linear_models.write_models(tmp_path, [BF16] * 3)
    assert why_not(base, parts, "token-weighted", {}) is None
    assert why_not(base, parts, "ties", {"density": 0.5}) == "ties has no GPU kernel"
    ota = get_method("ota")
    assert gpuunits.unsupported("ota", ota.parse_params({"density": 0.3})) == (
        "OTA with FFG masks (density) has no GPU kernel")
    assert gpuunits.unsupported("ota", ota.parse_params({"power": 0.7})).startswith(
        "OTA power 0.7")
    with monkeypatch.context() as m:  # triton's launcher is compiled at the first launch
        m.setattr(gpuunits, "DEVICE", "cuda")
        m.delenv("CC", raising=False)
        m.setenv("PATH", str(tmp_path))
        assert gpuunits.unsupported("token-weighted", None) == (
            "no C compiler for triton's launcher (gcc, clang or CC)")
    # triton missing (the CPU-index torch wheels do not bring it): the torch pass, and why
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "merit_merger.gpukernels", raising=False)
    monkeypatch.delattr(merit_merger, "gpukernels", raising=False)
    assert why_not(base, parts, "token-weighted", {}).startswith("triton is not importable")


@pytest.mark.skipif(INTERPRETED, reason="the torch pass on cuda needs a GPU")
def test_without_triton_a_gpu_merge_takes_the_torch_pass_there(tmp_path, monkeypatch):
    base, parts = linear_models.write_models(tmp_path, [F32] * 3)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "merit_merger.gpukernels", raising=False)
    monkeypatch.delattr(merit_merger, "gpukernels", raising=False)
    on_gpu = merge(base, parts, tmp_path / "gpu", "token-weighted", "cuda")
    on_cpu = merge(base, parts, tmp_path / "cpu", "token-weighted", "cpu")
    assert (on_gpu.kernel, on_cpu.kernel) == ("torch", "fused")
    assert_same(tmp_path, F32)
