"""The process group a training stage runs in: one process, or one per GPU under torchrun.

torchrun (or the Kubernetes Job that starts it) sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; with WORLD_SIZE > 1 this module starts the default process group (NCCL on
GPUs, gloo on CPUs) and every collective the stage needs goes through the few helpers here, so
the training code reads the same with one process or many. With one process nothing is
initialised and every helper is the identity. It does not decide what to shard (engine.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from meritrun.errors import SpecError

log = logging.getLogger(__name__)

GPUS_ENV = "MERITRUN_GPUS"  # set by the Job renderer from template.resources.limits
GPU_FIELD = 'spec.template.resources.limits["nvidia.com/gpu"]'
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: global rank and size, rank on its node, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


def choose_device(local_rank: int) -> torch.device:
    """cuda:<local rank> when the image has CUDA and a GPU is visible, else the CPU.

    GPUs requested for the pod ($MERITRUN_GPUS, rendered from the template) on an image whose
    torch has no CUDA is a spec error: the run would silently train on CPUs for days.
    """
    wanted = os.environ.get("MERITRUN_DEVICE")
    if wanted:
        return torch.device(wanted)
    requested = int(os.environ.get(GPUS_ENV) or 0)
    if requested > 0 and not torch.cuda.is_available():
        cuda = torch.version.cuda or "none (a CPU-only torch build)"
        raise SpecError(f"{requested} GPU(s) requested, but this image cannot use "
                        f"them: torch {torch.__version__}, CUDA {cuda}", path=GPU_FIELD)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start() -> Dist:
    """Join the process group torchrun describes (or none, for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(local_rank)
    if world == 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                      device_id=device if device.type == "cuda" else None)
    return Dist(rank=torch_dist.get_rank(), world=world, local_rank=local_rank,
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), device=device)


def stop(dist: Dist) -> None:
    if dist.sharded and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.sharded:
        torch_dist.barrier()


def all_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place; returned for chaining)."""
    if dist.sharded:
        moved = tensor.to(dist.device)
        torch_dist.all_reduce(moved, op=torch_dist.ReduceOp.SUM)
        tensor.copy_(moved.to(tensor.device))
    return tensor


def all_gather(dist: Dist, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (small picklable values only)."""
    if not dist.sharded:
        return [obj]
    out: list[Any] = [None] * dist.world
    torch_dist.all_gather_object(out, obj)
    return out


def node_leader_first(dist: Dist, fetch: Callable[[], Path]) -> Path:
    """Run `fetch` once per node (local rank 0) and hand its path to the node's other ranks.

    Downloads of the base model into a shared cache would otherwise race each other.
    """
    mine = fetch() if dist.local_rank == 0 else None
    paths = all_gather(dist, None if mine is None else str(mine))
    leader = dist.rank - dist.local_rank
    return Path(paths[leader]) if paths[leader] is not None else fetch()
