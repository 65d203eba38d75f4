"""LoRA partitions as full weights, one target tensor at a time, without instantiating peft.

A peft adapter dir holds adapter_config.json and adapter_model.safetensors with keys like
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (embeddings:
`lora_embedding_A` [r, num] and `lora_embedding_B` [dim, r]). The merged weight is what peft's
`merge_and_unload` computes: W + delta with delta = B @ A * scaling (transposed for
embeddings and fan_in_fan_out layers), scaling = alpha / r (alpha / sqrt(r) with rsLoRA;
rank_pattern / alpha_pattern override per module). `modules_to_save` copies and saved
`base_layer` weights replace the base tensor outright. DoRA and LoRA biases are refused: their
merge is not a fixed delta. A block of rows of delta needs only the matching rows of B (or
columns of A for the transposed layouts), so deltas are produced block by block too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .io import ModelReader

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PAIRS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
          ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


class AdapterFormatError(ValueError):
    """The adapter cannot be turned into full weights (verification turns it into a refusal)."""


@dataclass(frozen=True)
class LoraTarget:
    weight: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    scaling: float
    transposed: bool  # delta = (B @ A).T: embeddings and fan_in_fan_out layers


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rule: a pattern applies when the module name ends with it (after a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(default)


class LoraAdapter:
    """The targets, replacements and deltas of one peft LoRA adapter dir."""

    def __init__(self, adapter_dir: Path) -> None:
        self.dir = Path(adapter_dir)
        try:
            self.config = json.loads((self.dir / CONFIG_NAME).read_text())
        except (OSError, ValueError) as e:
            raise AdapterFormatError(f"unreadable {CONFIG_NAME}: {e}") from e
        if self.config.get("peft_type", "LORA") != "LORA":
            raise AdapterFormatError(f"peft_type {self.config.get('peft_type')} is not LORA")
        if self.config.get("use_dora") or self.config.get("lora_bias"):
            raise AdapterFormatError("DoRA / LoRA-bias adapters are not a fixed delta")
        self.reader = ModelReader(self.dir, files=[self.dir / WEIGHTS_NAME])
        self.targets: dict[str, LoraTarget] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key
        self._index(self.reader.names)

    def _index(self, keys: list[str]) -> None:
        pairs: dict[str, dict[str, str]] = {}
        kinds: dict[str, bool] = {}
        for key in keys:
            name = key.removeprefix(PREFIX)
            for suffix, (part, embedding) in _PAIRS.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    pairs.setdefault(module, {})[part] = key
                    kinds[module] = embedding
                    break
            else:
                if ".lora_" in name:
                    raise AdapterFormatError(f"unsupported adapter tensor {key}")
                self.replacements[name.replace(".base_layer.", ".")] = key
        r_default = self.config.get("r", 8)
        alpha_default = self.config.get("lora_alpha", r_default)
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, parts in pairs.items():
            if set(parts) != {"A", "B"}:
                raise AdapterFormatError(f"{module}: lora_A and lora_B must both be present")
            r = _pattern_value(self.config.get("rank_pattern") or {}, module, r_default)
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, alpha_default)
            scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
            self.targets[f"{module}.weight"] = LoraTarget(
                f"{module}.weight", parts["A"], parts["B"], scaling,
                transposed=kinds[module] or fan_in_fan_out)

    def close(self) -> None:
        self.reader.close()

    def delta_shape(self, target: LoraTarget) -> tuple[int, int]:
        a, b = self.reader.meta(target.a_key).shape, self.reader.meta(target.b_key).shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterFormatError(f"{target.weight}: lora_A {a} and lora_B {b} do not chain")
        return (a[1], b[0]) if target.transposed else (b[0], a[1])

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """fp32 rows [start, stop) of B @ A * scaling for the base tensor `name`."""
        t = self.targets[name]
        a = self.reader.read(t.a_key).float()
        b = self.reader.read(t.b_key).float()
        if t.transposed:  # delta = (B @ A).T: rows of delta are columns of A
            a_cols = a if rows is None else a[:, rows[0]:rows[1]]
            return (b @ a_cols).T.contiguous() * t.scaling
        b_rows = b if rows is None else b[rows[0]:rows[1]]
        return (b_rows @ a) * t.scaling

    def replacement(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.reader.read(self.replacements[name], rows).float()
