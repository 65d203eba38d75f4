"""One rank of `torchrun --nproc_per_node 2 -m support.sketch_worker OUT`: sketches its
Shard(0) part of a few seeded tensors (uneven row counts included) and all-reduces the sketch;
rank 0 saves the result to OUT for the test to compare with the unsharded sketch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from merit_trainer.profiling.sketch import CountSketch, add_sharded

SHAPES = {"a.weight": (37, 5), "b.weight": (8, 3, 2), "c.bias": (11,), "d.tiny": (1, 4)}
DIM = 64


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {n: torch.randn(*s, generator=generator) for n, s in SHAPES.items()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sketch = CountSketch(DIM, seed=3)
    total = torch.zeros(DIM, dtype=torch.float64)
    for name, full in tensors().items():
        shard = distribute_tensor(full, mesh, [Shard(0)])
        add_sharded(sketch, total, name, shard, rank=dist.get_rank(),
                    world=dist.get_world_size())
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        torch.save(total, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
