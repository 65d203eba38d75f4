"""What the engine merges: partition sources, and a uniform full-tensor view of each expert.

A partition is a full HF model dir or a LoRA adapter dir; `ExpertReader` hides the
difference, so every merge method sees theta_k as full fp32 tensors (LoRA: base or
modules_to_save copy, plus B @ A * scaling, computed block by block). No verification here:
`verification` decides what may be merged; this module only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .io import ModelReader
from .lora import LoraAdapter
from .moments import MomentReader

if TYPE_CHECKING:
    import torch

    from meritrun.artifacts import PartitionManifest


@dataclass(frozen=True)
class PartitionSource:
    """One contribution: its model dir, supervised token count, kind and second moments."""

    name: str
    model_dir: Path
    tokens: int
    weights: Literal["full", "lora"] = "full"
    moments: Path | None = None
    artifact_dir: Path | None = None
    manifest: PartitionManifest | None = None

    @classmethod
    def from_artifact(cls, artifact_dir: Path, *, name: str | None = None) -> PartitionSource:
        """Read manifest.json of a partition artifact dir (raises if absent or invalid)."""
        from meritrun.artifacts import read_manifest  # pydantic: 0.2 s a plain merge skips

        artifact_dir = Path(artifact_dir)
        manifest = read_manifest(artifact_dir)
        moments = None
        if manifest.second_moments is not None:
            moments = artifact_dir / manifest.second_moments.file
        return cls(name or manifest.partition, artifact_dir / manifest.model_dir,
                   manifest.tokens.supervised, manifest.weights, moments, artifact_dir, manifest)


def has_manifest(path: Path) -> bool:
    from meritrun.artifacts import MANIFEST_NAME

    return (Path(path) / MANIFEST_NAME).is_file()


class ExpertReader:
    """theta_k of one partition, tensor by tensor, in fp32 (full weights or base + LoRA)."""

    def __init__(self, source: PartitionSource, base: ModelReader) -> None:
        self.source = source
        self.base = base
        self.lora = LoraAdapter(source.model_dir) if source.weights == "lora" else None
        self.model = None if self.lora else ModelReader(source.model_dir)

    @property
    def bytes_read(self) -> int:
        reader = self.lora.reader if self.lora else self.model
        return reader.bytes_read

    def read(self, name: str, rows: tuple[int, int] | None = None,
             base_block: torch.Tensor | None = None) -> torch.Tensor:
        """theta_k block in fp32; `base_block` (fp32, same rows) saves a base read for LoRA."""
        if self.model is not None:
            return self.model.read(name, rows).float()
        lora = self.lora
        if name in lora.replacements:
            theta = lora.replacement(name, rows)
        elif base_block is not None:
            theta = base_block.clone()
        else:
            theta = self.base.read(name, rows).float()
        if name in lora.targets:
            theta.add_(lora.delta(name, rows).reshape(theta.shape))
        return theta

    def close(self) -> None:
        (self.lora or self.model).close()


def open_moments(sources: list[PartitionSource]) -> list[MomentReader]:
    missing = [s.name for s in sources if s.moments is None]
    if missing:
        raise ValueError(f"partitions without second moments: {missing}")
    return [MomentReader(s.moments) for s in sources]
