"""dtypes: safetensors element types without torch, as torch reads and names them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit_merger.dtypes import DTYPES, WIDENED, parse_dtype, to_float32


def test_the_table_agrees_with_torch():
    for name, dtype in DTYPES.items():
        t = dtype.torch
        assert (dtype.itemsize, dtype.is_floating_point) == (t.itemsize, t.is_floating_point)
        assert str(dtype) == str(t) and dtype.name == name  # messages read as they did


@pytest.mark.parametrize("value,want", [
    ("bf16", "BF16"), ("bfloat16", "BF16"), ("fp16", "F16"), ("half", "F16"),
    ("float32", "F32"), ("float", "F32"), ("double", "F64"), (torch.bfloat16, "BF16"),
    (torch.float16, "F16"), (None, None),
])
def test_output_dtypes_parse_from_names_and_torch_dtypes(value, want):
    got = parse_dtype(value)
    assert (got.name if got else None) == want


@pytest.mark.parametrize("value", ["int8", "torch.float32", "f32", torch.int64])
def test_anything_but_a_floating_dtype_is_refused(value):
    with pytest.raises(ValueError, match="unknown floating dtype"):
        parse_dtype(value)


@pytest.mark.parametrize("name", sorted(WIDENED) + ["I32", "U8"])
def test_to_float32_equals_torchs_float(name):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=g) * 1e3
    values[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    t = values.to(DTYPES[name].torch)
    raw = t.view(torch.uint8).numpy().copy()
    want = t.float().numpy().tobytes()
    got = to_float32(raw, DTYPES[name])
    assert got.dtype == np.float32 and got.tobytes() == want
    reused = np.full(1500, 7.0, np.float32)  # a caller's buffer, larger than needed
    assert to_float32(raw, DTYPES[name], out=reused).tobytes() == want
