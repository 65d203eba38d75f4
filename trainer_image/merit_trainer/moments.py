"""Adam second moments for the OTA merge: rank-1 compression and the optimizer_v file format.

OTA weighs each expert's update by its Adam `exp_avg_sq` (v). A full v is as large as the model,
so anything that crosses a network gets the rank-1 factors instead: for a matrix viewed as
(shape[0], -1), v_hat = outer(row sums, column sums) / total, stored as the factors (O(m + n)),
never as v_hat. 1-D tensors are kept exact. Values are raw exp_avg_sq in fp32 (no bias
correction); beta2 and the step count are recorded so a reader can correct if it wants to.

The merger reads exactly this format (see docs/artifact-format.md); this module does no
training and knows nothing about models beyond tensor names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from meritrun.errors import IntegrityError

MomentKind = Literal["rank1", "full"]
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MomentEntry = torch.Tensor | Factors
SEP = "::"
_FACTOR_NAMES = ("row", "col", "total")


def compress_rank1(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"row", "col", "total"} factors of v (ndim >= 2), or {"exact": v} for a 1-D tensor.

    Sums accumulate in fp64 (a large matrix of small values loses digits in fp32) and are
    stored in fp32.
    """
    if v.ndim < 2:
        return {"exact": v.detach().to(torch.float32).clone()}
    m = v.detach().reshape(v.shape[0], -1).to(torch.float64)
    return {
        "row": m.sum(dim=1).to(torch.float32),
        "col": m.sum(dim=0).to(torch.float32),
        "total": m.sum().reshape(1).to(torch.float32),
    }


def expand_rank1(
    row: torch.Tensor, col: torch.Tensor, total: torch.Tensor, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """v_hat = outer(row, col) / total in fp32, reshaped to the parameter's shape.

    A zero total means the parameter never had a gradient: its v_hat is zero, not NaN.
    """
    denom = float(total.reshape(-1)[0])
    if denom == 0.0:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    outer = torch.outer(row.to(torch.float64), col.to(torch.float64)) / denom
    return outer.to(torch.float32).reshape(tuple(shape))


def save_second_moments(
    path: Path, named_v: Mapping[str, torch.Tensor], *, kind: MomentKind, beta2: float, step: int
) -> Path:
    """Write optimizer_v.safetensors: `full` stores every v as fp32; `rank1` stores
    NAME::row / NAME::col / NAME::total for ndim >= 2 and NAME (exact) for 1-D tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for name, v in named_v.items():
        if kind == "full" or v.ndim < 2:
            tensors[name] = v.detach().to(torch.float32).contiguous().clone()
            continue
        for factor, t in compress_rank1(v).items():
            tensors[f"{name}{SEP}{factor}"] = t.contiguous()
    return write_moment_file(path, tensors, kind=kind, beta2=beta2, step=step)


def write_moment_file(path: Path, tensors: Mapping[str, torch.Tensor], *, kind: MomentKind,
                      beta2: float, step: int) -> Path:
    """Write already-prepared entries (full v, or NAME::row/col/total) with the metadata."""
    if kind not in ("rank1", "full"):
        raise ValueError(f"unknown second-moment kind {kind!r}")
    for key in tensors:
        name, _, factor = key.partition(SEP)
        if SEP in factor or (factor and factor not in _FACTOR_NAMES):
            raise ValueError(f"tensor name {name!r} contains the reserved separator {SEP!r}")
    meta = {"kind": kind, "beta2": repr(float(beta2)), "step": str(int(step)),
            "bias_corrected": "false"}
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=meta)
    return path


def load_second_moments(path: Path) -> tuple[MomentKind, dict[str, MomentEntry], dict[str, str]]:
    """(kind, name -> full tensor or (row, col, total) factors, metadata) of an optimizer_v file.

    Loads everything; the merger streaming a large model opens the file with safe_open itself
    and uses `dense_second_moment` per tensor.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        kind = meta.get("kind")
        if kind not in ("rank1", "full"):
            raise IntegrityError(f"{path}: metadata kind {kind!r} is not 'rank1' or 'full'")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    entries: dict[str, MomentEntry] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        name, sep, factor = key.partition(SEP)
        if not sep:
            entries[name] = t
        elif kind == "rank1" and factor in _FACTOR_NAMES:
            factors.setdefault(name, {})[factor] = t
        else:
            raise IntegrityError(f"{path}: unexpected key {key!r} in a {kind} file")
    for name, parts in factors.items():
        if set(parts) != set(_FACTOR_NAMES):
            lacking = sorted(set(_FACTOR_NAMES) - set(parts))
            raise IntegrityError(f"{path}: {name} lacks rank-1 factor(s) {lacking}")
        entries[name] = (parts["row"], parts["col"], parts["total"])
    return kind, entries, meta


def dense_second_moment(entry: MomentEntry, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The fp32 v (exact or rank-1 expanded) of one parameter with the given shape."""
    shape = tuple(shape)
    if isinstance(entry, torch.Tensor):
        if tuple(entry.shape) != shape:
            raise IntegrityError(f"second moment shape {tuple(entry.shape)} != parameter {shape}")
        return entry.to(torch.float32)
    row, col, total = entry
    rows, cols = (shape[0], _prod(shape[1:])) if len(shape) >= 2 else (-1, -1)
    if len(shape) < 2 or row.numel() != rows or col.numel() != cols:
        raise IntegrityError(
            f"rank-1 factors ({row.numel()}, {col.numel()}) do not fit parameter shape {shape}"
        )
    return expand_rank1(row, col, total, shape)


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def optimizer_second_moments(
    optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.nn.Parameter]
) -> tuple[dict[str, torch.Tensor], float, int]:
    """(name -> exp_avg_sq, beta2, step) from an Adam/AdamW optimizer's final state.

    A parameter with no state (it never got a gradient) has v = 0: OTA then weighs its update
    by epsilon alone, which is right for a weight that did not move.
    """
    beta2 = float(optimizer.param_groups[0]["betas"][1])
    named_v, step = {}, 0
    for name, p in named_params.items():
        state = optimizer.state.get(p) or {}
        v = state.get("exp_avg_sq")
        named_v[name] = (v if v is not None else torch.zeros_like(p)).detach().float().cpu()
        if "step" in state:
            step = max(step, int(state["step"]))
    return named_v, beta2, step
