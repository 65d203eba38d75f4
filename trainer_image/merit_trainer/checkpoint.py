"""Resumable training: the step plan, the batch order and checkpoints of a partition.

A partition Job can be preempted or its node can die; the next attempt of the same partition
with the same configuration continues from the last checkpoint instead of from the base model.
Checkpoints are sharded distributed checkpoints (torch.distributed.checkpoint): every rank
writes its own shards of the weights and the optimizer state, nobody gathers them. They live in
the work directory (on Kubernetes the run's work volume, a PVC when `template.workVolume` is
set) under checkpoints/<identity>/step-<n>; the identity hashes run, partition, sources, base,
training configuration and data, but not the attempt, so a retry resumes and anything else
starts over. A step directory counts once rank 0 has renamed it into place after every rank
wrote, so a crash while saving leaves the previous checkpoint. When the work directory does not
outlive the attempt (an emptyDir), the stage parameters name a storage prefix and every step is
also uploaded there (checkpoint_mirror.py); resume takes the newer of the two. The batch of
every step is a pure function of (seed, step), so a resumed run feeds exactly what an
uninterrupted run would have fed. This is not the artifact (training.py and export.py write that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint_mirror import META_NAME, CheckpointMirror
from .dist import Dist, all_gather, barrier

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
RESTORE_DIR = "restored"  # steps downloaded from storage, one directory per node


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
    schedule: str = "linear"


def plan_steps(n_examples: int, *, batch_size: int, epochs: float, max_steps: int | None,
               warmup_ratio: float = 0.0, schedule: str = "linear") -> StepPlan:
    """Steps of a run: a partial last batch still makes a step; fractional epochs round up."""
    per_epoch = math.ceil(n_examples / batch_size)
    total = max(1, math.ceil(epochs * per_epoch - 1e-9))  # 0.1 * 30 is 3.0000000000000004
    if max_steps is not None:
        total = min(total, max_steps)
    return StepPlan(per_epoch, total, math.ceil(warmup_ratio * total), schedule)


def lr_factor(step: int, plan: StepPlan) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`.

    Linear warm-up, then linear or cosine decay; neither reaches zero at the last step (a
    step with learning rate 0 would be wasted data).
    """
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    decay = max(1, plan.total_steps - plan.warmup_steps)
    if plan.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - plan.warmup_steps) / decay))
    return (plan.total_steps - step) / decay


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


def checkpoint_root(workdir: Path, identity: str) -> Path:
    return Path(workdir) / CHECKPOINTS_DIR / identity[:32]


def _complete_steps(root: Path, identity: str) -> list[int]:
    steps = []
    for meta in root.glob(f"step-*/{META_NAME}"):
        try:
            if json.loads(meta.read_text()).get("identity") == identity:
                steps.append(int(meta.parent.name.removeprefix("step-")))
        except (OSError, ValueError):
            log.warning("ignoring unreadable checkpoint %s", meta.parent)
    return sorted(steps)


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(
    root: Path, *, identity: str, dist: Dist, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress, mirror: CheckpointMirror | None = None,
) -> Path:
    """Every rank writes its shards (and uploads them, with a mirror); rank 0 then moves the
    step into place and drops older ones."""
    import torch.distributed.checkpoint as dcp

    final = Path(root) / f"step-{progress.step:08d}"
    tmp = Path(root) / f".step-{progress.step:08d}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(dist)
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp))  # each node creates tmp
    meta = {"identity": identity, "scheduler": scheduler.state_dict(), **asdict(progress)}
    if mirror is not None:
        mirror.upload(tmp, step=progress.step, meta=meta, dist=dist)
    barrier(dist)
    if dist.main:
        (tmp / META_NAME).write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    if dist.local_rank == 0 and not dist.main:  # a node without the step: nothing to keep
        shutil.rmtree(tmp, ignore_errors=True)
    log.debug("checkpoint at step %d -> %s", progress.step, final)
    return final


def _latest(root: Path, *, identity: str, dist: Dist,
            mirror: CheckpointMirror | None) -> tuple[Path, bool] | None:
    """The newest complete step every rank can read: (directory, downloaded?), or None.

    The work directory's own step when it is at least as new as storage's (no download);
    otherwise storage's, fetched into the work directory once per node.
    """
    seen = all_gather(dist, _complete_steps(Path(root), identity))
    local = set(seen[0]).intersection(*map(set, seen[1:]))
    remote = mirror.complete_steps(dist) if mirror is not None else []
    if remote and max(remote) > max(local, default=-1):
        return mirror.download(max(remote), Path(root) / RESTORE_DIR, dist=dist), True
    if local:
        return Path(root) / f"step-{max(local):08d}", False
    return None


def load_checkpoint(
    root: Path, *, identity: str, dist: Dist, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    mirror: CheckpointMirror | None = None,
) -> Progress | None:
    """Restore the latest complete step (work directory or storage); None for a fresh start."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    latest = _latest(Path(root), identity=identity, dist=dist, mirror=mirror)
    if latest is None:
        return None
    found, downloaded = latest
    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(found))
    set_state_dict(model, optimizer, model_state_dict=states["model"],
                   optim_state_dict=states["optim"])
    meta = json.loads((found / META_NAME).read_text())
    meta.pop("identity")
    scheduler.load_state_dict(meta.pop("scheduler"))
    progress = Progress(**meta)
    if downloaded:  # loaded into memory; the next save writes a local step again
        barrier(dist)
        if dist.local_rank == 0:
            shutil.rmtree(Path(root) / RESTORE_DIR, ignore_errors=True)
    log.info("resuming from checkpoint %s at step %d", found, progress.step)
    return progress


def remove_checkpoints(root: Path, dist: Dist, mirror: CheckpointMirror | None = None) -> None:
    """After publishing: the artifact supersedes every checkpoint of this training."""
    barrier(dist)
    if dist.main:
        shutil.rmtree(root, ignore_errors=True)
    if mirror is not None:
        mirror.remove_all(dist)
