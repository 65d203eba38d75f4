"""Resumable training: the step plan, the batch order and checkpoints of one attempt.

A partition Job can be preempted or its node can die; rerunning the same attempt with the same
work directory continues from the last checkpoint instead of from the base model. A checkpoint
holds the trainable weights, optimizer, scheduler, RNG states and progress counters, plus an
identity (run, partition, attempt, hyperparameters, base fingerprint): a checkpoint of anything
else is ignored, never resumed. Writes are atomic (temp dir, then rename), so a crash while
saving leaves the previous checkpoint intact. The batch of every step is a pure function of
(seed, step), so a resumed run feeds exactly what an uninterrupted run would have fed. This is
not the artifact (training.py writes that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meritrun.errors import StageFailed

log = logging.getLogger(__name__)

META_NAME = "meta.json"
WEIGHTS_NAME = "trainable.safetensors"
STATE_NAME = "state.pt"


@dataclass
class Progress:
    """Counters that must survive a restart for the artifact to match an uninterrupted run."""

    step: int = 0
    supervised: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(n_examples: int, *, batch_size: int, epochs: float, max_steps: int | None,
               warmup_ratio: float = 0.0) -> StepPlan:
    """Steps of a run: a partial last batch still makes a step; fractional epochs round up."""
    per_epoch = math.ceil(n_examples / batch_size)
    total = max(1, math.ceil(epochs * per_epoch - 1e-9))  # 0.1 * 30 is 3.0000000000000004
    if max_steps is not None:
        total = min(total, max_steps)
    return StepPlan(per_epoch, total, math.ceil(warmup_ratio * total))


def lr_factor(step: int, plan: StepPlan) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    return (plan.total_steps - step) / max(1, plan.total_steps - plan.warmup_steps)


def batch_indices(step: int, *, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of one step. Each epoch's order depends only on (seed, epoch), so a resumed
    run feeds exactly the batches an uninterrupted run would have fed."""
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order[position * batch_size:(position + 1) * batch_size]


def checkpoint_identity(fields: dict) -> str:
    """sha256 of the canonical JSON of what makes two trainings the same training."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = model.named_parameters()
    return {n: p.detach().cpu().contiguous() for n, p in named if p.requires_grad}


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    directory: Path, *, identity: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
) -> Path:
    """Write a checkpoint to `directory`, replacing the previous one atomically."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable(model), str(tmp / WEIGHTS_NAME))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_states(), "param_names": list(_trainable(model))}, tmp / STATE_NAME)
    (tmp / META_NAME).write_text(json.dumps({"identity": identity, **asdict(progress)}))
    # Rename dance: between the two renames only `old` exists, and load_checkpoint looks there.
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint at step %d -> %s", progress.step, directory)
    return directory


def find_checkpoint(directory: Path, identity: str) -> Path | None:
    """The checkpoint directory of this identity, if one is complete on disk."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(f".{directory.name}.old")):
        meta = candidate / META_NAME
        if not meta.is_file():
            continue
        try:
            found = json.loads(meta.read_text()).get("identity")
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable checkpoint %s", candidate)
            continue
        if found == identity:
            return candidate
        log.warning("ignoring checkpoint %s: it belongs to another run/partition/attempt or "
                    "other hyperparameters", candidate)
    return None


def load_checkpoint(
    directory: Path, *, identity: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress | None:
    """Restore model, optimizer, scheduler and RNG from a matching checkpoint; None if none."""
    found = find_checkpoint(directory, identity)
    if found is None:
        return None
    weights = load_file(str(found / WEIGHTS_NAME))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise StageFailed(f"checkpoint {found} holds other parameters than the model trains")
    model.load_state_dict(weights, strict=False)
    state = torch.load(found / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"])
    meta = json.loads((found / META_NAME).read_text())
    meta.pop("identity")
    progress = Progress(**meta)
    log.info("resuming from checkpoint %s at step %d", found, progress.step)
    return progress


def read_optimizer_moments(directory: Path) -> dict[str, torch.Tensor]:
    """name -> exp_avg_sq of a saved checkpoint (for inspection and tests)."""
    state = torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=True)
    names = state["param_names"]
    per_index = state["optimizer"]["state"]
    return {names[i]: s["exp_avg_sq"] for i, s in per_index.items()}
