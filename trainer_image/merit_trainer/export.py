"""Turning a (possibly sharded) trained model into artifact files, written by rank 0 only.

Weights: every rank takes part in gathering one parameter at a time (`full_tensor`), rank 0
casts it to the base's dtype and adds it to the current safetensors shard, which is written and
dropped as soon as it reaches the size limit (5 GB by default), so no process ever holds more
than one shard of the model. The files follow the Hugging Face layout (model.safetensors, or
model-0000k-of-0000N.safetensors plus model.safetensors.index.json).

Second moments (Adam exp_avg_sq, for OTA): the rank-1 factors of a sharded matrix come from its
shards. FSDP2 shards dim 0, so each rank owns whole rows: row sums are local and gathered (m
numbers), column sums and the total are all-reduced. No rank ever holds a full v. The `full`
kind gathers one parameter at a time. Sums run in fp64 as in moments.compress_rank1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dist import Dist, all_gather, all_sum
from .moments import SEP, compress_rank1

DEFAULT_SHARD_BYTES = 5 * 10**9
SHARD_BYTES_ENV = "MERITRUN_MAX_SHARD_BYTES"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64}


def max_shard_bytes() -> int:
    return int(os.environ.get(SHARD_BYTES_ENV) or DEFAULT_SHARD_BYTES)


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype of the base's floating-point weights (the artifact is written in it)."""
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a collective for a sharded DTensor), on the CPU."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()


def exported_tensors(model: torch.nn.Module, *, trainable_only: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of what the saved model holds: parameters once each (tied weights under
    their first name, as Hugging Face saves them), then persistent buffers."""
    keys = set(model.state_dict().keys())
    for name, p in model.named_parameters():
        if name in keys and (p.requires_grad or not trainable_only):
            yield name, p
    if not trainable_only:
        for name, b in model.named_buffers():
            if name in keys:
                yield name, b


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_weights(model_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]], *, dist: Dist,
                  dtype: torch.dtype, shard_bytes: int) -> list[str]:
    """Gather tensor by tensor; rank 0 writes HF safetensors shards of at most `shard_bytes`
    (a single tensor larger than that gets a shard of its own). Returns the file names."""
    parts: list[dict[str, str]] = []  # per shard: name -> part file
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            part = f".part-{len(parts):05d}.safetensors"
            save_file(current, str(model_dir / part), metadata={"format": "pt"})
            parts.append(dict.fromkeys(current, part))
            current, size = {}, 0

    for name, t in tensors:
        full = gather_full(t)
        if not dist.main:
            continue
        full = full.to(dtype) if full.is_floating_point() else full
        nbytes = full.numel() * full.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = full.contiguous()
        size, total = size + nbytes, total + nbytes
    if not dist.main:
        return []
    flush()
    names = _shard_names(len(parts))
    weight_map: dict[str, str] = {}
    for final, part in zip(names, parts, strict=True):
        (model_dir / next(iter(part.values()))).rename(model_dir / final)
        weight_map.update(dict.fromkeys(part, final))
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def sharded_rank1(v: torch.Tensor, *, dist: Dist) -> dict[str, torch.Tensor]:
    """compress_rank1(v) computed from v's dim-0 shards, without gathering v."""
    if v.ndim < 2:
        return {"exact": gather_full(v).float()}
    if not (_is_dtensor(v) and v.placements[0].is_shard(0)):
        return compress_rank1(gather_full(v))
    cols_n = math.prod(v.shape[1:])
    local = v.to_local().detach().reshape(-1, cols_n).to(torch.float64).cpu()
    rows = torch.cat(all_gather(dist, local.sum(dim=1)))
    cols = all_sum(dist, local.sum(dim=0))
    total = all_sum(dist, local.sum().reshape(1))
    return {"row": rows.float(), "col": cols.float(), "total": total.float()}


def moment_tensors(named_v: Iterator[tuple[str, torch.Tensor]], *, kind: str,
                   dist: Dist) -> dict[str, torch.Tensor]:
    """The optimizer_v file's tensors (on rank 0; empty elsewhere), one parameter at a time."""
    out: dict[str, torch.Tensor] = {}
    for name, v in named_v:
        if kind == "full" or v.ndim < 2:
            full = gather_full(v).float()
            if dist.main:
                out[name] = full.contiguous()
            continue
        for factor, t in sharded_rank1(v, dist=dist).items():
            if dist.main:
                out[f"{name}{SEP}{factor}"] = t.contiguous()
    return out
