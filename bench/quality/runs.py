"""Training runs of the benchmark through the project's own trainer, cached for resumption.

Every model the benchmark trains (the stage-2 base, every arm's partitions, the capability
experts, the real mixtures of the search check) goes through `merit_trainer.training.
train_partition` with real TrainParams and a file:// storage root, so it produces the same
artifact (manifest with supervised-token counts, model dir, Adam second moments) a cluster run
would, and the merge engine reads it unchanged. A run whose manifest already exists is not
trained again: rerunning the benchmark after a crash skips finished work. This module does not
decide what to train (see `arms`) and does no evaluation.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meritrun.api import DataSpec, TrainingSpec
from meritrun.artifacts import MANIFEST_NAME, PartitionManifest, read_manifest
from meritrun.stages import StorageParams, TrainParams

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """Where runs live and the settings every run shares."""

    workdir: Path
    data_uri: str
    batch_size: int
    max_seq_len: int = 64
    warmup_ratio: float = 0.1
    seconds: dict[str, float] = field(default_factory=dict)  # run name -> training wall time

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def artifact(self, name: str) -> Path:
        return self.store / "runs" / name

    def train(
        self, name: str, *, base_dir: Path, sources: Sequence[str], epochs: float, lr: float,
        seed: int, index: int = 0, moments: str = "rank1", data_uri: str | None = None,
        max_steps: int | None = None,
    ) -> PartitionManifest:
        """Train (or reuse) run `name`: `sources` from `base_dir`, seed = seed + index."""
        from merit_trainer.training import train_partition

        out = self.artifact(name)
        if (out / MANIFEST_NAME).is_file():
            return read_manifest(out)
        params = TrainParams(
            run="quality", run_uid="bench", attempt=1,
            storage=StorageParams(uri=self.store.resolve().as_uri()),
            base_model=str(base_dir), output=f"runs/{name}", partition=name, index=index,
            sources=list(sources), data=DataSpec(uri=data_uri or self.data_uri),
            training=TrainingSpec(
                learning_rate=lr, epochs=epochs, batch_size=self.batch_size,
                max_seq_len=self.max_seq_len, warmup_ratio=self.warmup_ratio,
                second_moments=moments, seed=seed, max_steps=max_steps,
            ),
        )
        scratch = self.workdir / "scratch" / name
        started = time.monotonic()
        manifest = train_partition(params, workdir=scratch, checkpoint_every=0)
        self.seconds[name] = time.monotonic() - started
        shutil.rmtree(scratch, ignore_errors=True)  # the artifact is in the store now
        log.debug("trained %s in %.1fs", name, self.seconds[name])
        return manifest

    def model_dir(self, name: str) -> Path:
        return self.artifact(name) / "model"
