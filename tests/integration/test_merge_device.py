"""`merge.device`: the element-wise methods and FFG's threshold run where the spec says.

The same test runs on the CPU (device given explicitly, so the spec -> settings -> engine
plumbing is exercised on every machine) and on a GPU whenever one is present; either way the
fp32 result must equal an independent float64 computation (token-weighted, task arithmetic)
or the plain CPU merge (OTA with FFG) to 1e-6 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.experts import load_state, make_experts

from merit_merger.engine import merge_models
from merit_merger.job import merge_device, settings_from_spec
from merit_merger.sources import PartitionSource
from meritrun.api import MergeSpec, OtaSpec
from meritrun.errors import SpecError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU on this machine"))]
REL = 1e-6


@pytest.fixture(scope="module")
def experts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_experts(tmp_path_factory.mktemp("device"), tiny_base, 3)


def merge(experts, spec: MergeSpec, out: Path, *, device: str | None = None,
          kernel: str | None = None) -> dict:
    """The merged state; `kernel`: the pass the merge must have taken."""
    settings = settings_from_spec(spec, device=device)
    parts = [PartitionSource.from_artifact(a) for a in experts.artifacts]
    result = merge_models(base_dir=experts.base_dir, partitions=parts, method=settings.method,
                 params=settings.params, out_dir=out, shard_size_bytes=1 << 30,
                 output_dtype="float32", device=settings.device, chunk_elements=4096)
    assert kernel is None or result.kernel == kernel
    return load_state(out)


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        scale = t.double().abs().max().clamp(min=1e-30)
        err = (got[name].double() - t.double()).abs().max() / scale
        assert err <= REL, (name, float(err))


def reference(experts, method: str) -> dict:
    base = load_state(experts.base_dir)
    total = sum(experts.tokens)
    out = {}
    for name, b in base.items():
        thetas = [s[name].double() for s in experts.states]
        if method == "tokenWeighted":
            out[name] = sum(t * (n / total) for t, n in zip(thetas, experts.tokens, strict=True))
        else:
            out[name] = b.double() + 0.5 * sum(t - b.double() for t in thetas)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["tokenWeighted", "taskArithmetic"])
def test_elementwise_merge_on_the_device_equals_float64(experts, tmp_path, device, method):
    spec = MergeSpec(method=method, scale=0.5, device=device)
    assert settings_from_spec(spec).device == device
    # on a GPU: the fused pass's units there (gpuunits, Triton kernels)
    kernel = "fused-gpu" if device == "cuda" else "fused"
    assert_close(merge(experts, spec, tmp_path / "out", kernel=kernel),
                 reference(experts, method))


@pytest.mark.parametrize("device", DEVICES)
def test_ota_ffg_threshold_and_merge_on_the_device_equal_the_cpu(experts, tmp_path, device):
    spec = MergeSpec(method="ota", ota=OtaSpec(density=0.3), device=device)
    on_device = merge(experts, spec, tmp_path / "dev",  # FFG masks: no GPU kernel
                      kernel="torch" if device == "cuda" else "fused")
    on_cpu = merge(experts, spec, tmp_path / "cpu", device="cpu")
    assert_close(on_device, on_cpu)


def test_cuda_without_a_gpu_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match="merge.device"):
        merge_device("cuda")
    assert merge_device("auto") == "cpu" and merge_device("cpu") == "cpu"
