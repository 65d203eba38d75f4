"""The element types of safetensors files, without torch.

A merge that takes the fused pass (`fusedmerge`) never needs torch, and importing it costs
about 3 s of a 6 s merge of a 1B model; so tensor metadata (`io.TensorMeta`), the output
plan (`writer`) and the engine speak of dtypes through `Dtype`: the safetensors name, the
size of an element and whether it is a float. The torch pass asks a Dtype for its torch
dtype (`Dtype.torch`), which imports torch then, and only then.

`str(dtype)` is torch's spelling (`torch.bfloat16`), so messages read as they did when the
metadata held torch dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Dtype:
    """One safetensors element type."""

    name: str  # as in a safetensors header: BF16
    itemsize: int  # bytes per element
    is_floating_point: bool
    torch_name: str  # the torch dtype's attribute name: bfloat16

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch: for the torch pass only)."""
        import torch

        return getattr(torch, self.torch_name)

    def __str__(self) -> str:
        return f"torch.{self.torch_name}"

    __repr__ = __str__


_TABLE = [("F64", 8, True, "float64"), ("F32", 4, True, "float32"), ("F16", 2, True, "float16"),
          ("BF16", 2, True, "bfloat16"), ("I64", 8, False, "int64"), ("I32", 4, False, "int32"),
          ("I16", 2, False, "int16"), ("I8", 1, False, "int8"), ("U8", 1, False, "uint8"),
          ("BOOL", 1, False, "bool"), ("F8_E4M3", 1, True, "float8_e4m3fn"),
          ("F8_E5M2", 1, True, "float8_e5m2")]
DTYPES: dict[str, Dtype] = {row[0]: Dtype(*row) for row in _TABLE}  # by safetensors name
_BY_TORCH_NAME = {d.torch_name: d for d in DTYPES.values()}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32", "double": "float64"}


def parse_dtype(value: Any) -> Dtype | None:
    """A floating output dtype from a name (`bf16`, `bfloat16`, `float32`, ...), a torch dtype
    or a Dtype; None stays None (the inputs' dtypes are kept)."""
    if value is None or isinstance(value, Dtype):
        return value
    name = str(value)
    if not isinstance(value, str):  # a torch dtype, without importing torch to ask
        name = name.removeprefix("torch.")
    dtype = _BY_TORCH_NAME.get(_ALIASES.get(name, name))
    if dtype is None or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {value!r}")
    return dtype


def to_float32(raw: np.ndarray, dtype: Dtype, out: np.ndarray | None = None) -> np.ndarray:
    """The elements stored in `raw` (bytes, as read) as fp32, as torch's `.float()` gives
    them: a view when they are fp32 already, else written into `out` (fp32, at least that
    many elements; reused by the caller) or a fresh array."""
    if dtype.name == "F32":
        return raw.view(np.float32)
    if dtype.name not in _NUMPY and dtype.name != "BF16":
        raise ValueError(f"{dtype} has no numpy conversion to float32")
    count = raw.size // dtype.itemsize
    out = np.empty(count, np.float32) if out is None else out[:count]
    if dtype.name == "BF16":  # the high half of an fp32: exact
        bits = out.view(np.uint32)
        np.copyto(bits, raw.view(np.uint16))
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, raw.view(_NUMPY[dtype.name]), casting="unsafe")
    return out


WIDENED = {"F32", "BF16", "F16", "F64"}  # the floats `to_float32` takes
_NUMPY = {"F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
