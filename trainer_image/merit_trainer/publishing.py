"""The train stage's outputs: the artifact directory, its upload, and the progress file.

Only rank 0 writes files; every rank takes part in the gathers that feed them (export.py). The
artifact directory is rebuilt from scratch, so a retried attempt never keeps stale files; the
manifest goes up last, after every file it vouches for. The progress file
(`<output>/progress.json`: {"stage", "step", "total", "loss", "updated"}) is what the status
display polls while a partition trains; it is written at most every couple of seconds and a
failure to write it never fails training.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from meritrun.artifacts import (
    MANIFEST_NAME,
    OPTIMIZER_V_NAME,
    PartitionManifest,
    SecondMoments,
    write_manifest,
)
from meritrun.errors import MeritRunError, StageFailed
from meritrun.progress import progress_key
from meritrun.stages import TrainParams
from meritrun.storage import open_storage

from .dist import Dist, barrier
from .export import exported_tensors, gather_full, moment_tensors, write_weights
from .moments import write_moment_file

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0


def _open(params: TrainParams):
    return open_storage(params.storage.uri, endpoint=params.storage.endpoint,
                        region=params.storage.region)


class ProgressFile:
    """Rank 0's `<output>/progress.json`, rewritten at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, params: TrainParams, *, enabled: bool) -> None:
        self._key = progress_key(params.output)
        self._storage = _open(params) if enabled else None
        self._last = float("-inf")

    def update(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if self._storage is None or (now - self._last < PROGRESS_EVERY_S and step < total):
            return
        self._last = now
        body = {"stage": "train", "step": step, "total": total, "loss": loss,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            self._storage.put_bytes(self._key, json.dumps(body).encode())
        except (MeritRunError, OSError) as e:  # a display aid: training goes on without it
            log.warning("could not write %s: %s", self._key, e)


def publish_artifact(params: TrainParams, artifact_dir: Path, manifest: PartitionManifest) -> None:
    """Upload the artifact files, then the manifest last: its presence means "complete".

    A manifest left by an earlier try of this attempt is deleted first, so it never vouches
    for files that are being replaced.
    """
    storage = _open(params)
    manifest_key = f"{params.output}/{MANIFEST_NAME}"
    storage.delete_prefix(manifest_key)
    # progress.json is for watching a running stage; the artifact holds only listed files (the
    # merge refuses an unlisted one, and on file:// storage it reads the prefix in place)
    storage.delete_prefix(progress_key(params.output))
    storage.upload_dir(artifact_dir, params.output)
    storage.put_file(manifest_key, write_manifest(artifact_dir, manifest))
    log.info("partition %s attempt %d published to %s (%d supervised tokens)", params.partition,
             params.attempt, storage.uri_for(params.output), manifest.tokens.supervised)


def _save_config(model: torch.nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
    config = model.config
    config.dtype = dtype
    config.save_pretrained(model_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(model_dir)


def _save_adapter(model: torch.nn.Module, model_dir: Path, *, dist: Dist,
                  dtype: torch.dtype) -> None:
    """peft adapter files from the gathered trainable (LoRA) tensors."""
    full = {name: gather_full(t).to(dtype) for name, t in
            exported_tensors(model, trainable_only=True)}
    if dist.main:
        model.save_pretrained(model_dir, state_dict=full)


def write_artifact(
    artifact_dir: Path, *, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer,
    dist: Dist, kind: str, lora: bool, dtype: torch.dtype, shard_bytes: int, log_data: dict,
) -> SecondMoments | None:
    """model/ (HF dir or peft adapter + tokenizer), optimizer_v, train_log.json, loss.png."""
    model_dir = artifact_dir / "model"
    if dist.main:
        shutil.rmtree(artifact_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
    barrier(dist)
    if lora:
        _save_adapter(model, model_dir, dist=dist, dtype=dtype)
    else:
        write_weights(model_dir, exported_tensors(model), dist=dist, dtype=dtype,
                      shard_bytes=shard_bytes)
    moments = None if kind == "none" else _write_moments(
        artifact_dir, model=model, optimizer=optimizer, dist=dist, kind=kind, lora=lora)
    if dist.main:
        if not lora:
            _save_config(model, model_dir, dtype)
        tokenizer.save_pretrained(model_dir)
        (artifact_dir / "train_log.json").write_text(json.dumps(log_data, indent=1))
        plot_loss(artifact_dir / "loss.png", log_data["loss"])
    barrier(dist)
    return moments


def _write_moments(artifact_dir: Path, *, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, dist: Dist, kind: str,
                   lora: bool) -> SecondMoments:
    """optimizer_v.safetensors from the (sharded) AdamW state, one parameter at a time.

    A parameter with no state (it never got a gradient) has v = 0: OTA then weighs its update
    by epsilon alone, which is right for a weight that did not move.
    """
    beta2 = float(optimizer.param_groups[0]["betas"][1])
    step, named_v = 0, []
    for name, p in exported_tensors(model, trainable_only=True):
        state = optimizer.state.get(p) or {}
        named_v.append((name, state.get("exp_avg_sq", torch.zeros_like(p))))
        if "step" in state:
            step = max(step, int(state["step"]))
    tensors = moment_tensors(iter(named_v), kind=kind, dist=dist)
    if dist.main:
        # Keys must be the names in the saved weights file (peft drops the adapter name).
        if lora:
            tensors = {k.replace(".default.", "."): t for k, t in tensors.items()}
        names = {k.partition("::")[0] for k in tensors}
        missing = sorted(names - saved_tensor_names(artifact_dir / "model"))
        if missing:
            raise StageFailed(f"second moments name tensors the saved model lacks: {missing[:3]}")
        write_moment_file(artifact_dir / OPTIMIZER_V_NAME, tensors, kind=kind, beta2=beta2,
                          step=step)
    return SecondMoments(kind=kind, beta2=beta2, step=step)


def saved_tensor_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def plot_loss(path: Path, losses: list[float]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state to fight over

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("supervised loss (nats/token)")
    ax.set_title("partition training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
