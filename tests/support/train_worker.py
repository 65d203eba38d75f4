"""One rank of a torchrun gang running the train stage, with test-only switches.

Run as `torchrun --nproc_per_node N -m support.train_worker PARAMS WORKDIR [options]` (tests/ on
PYTHONPATH).
--die-after-step K: rank 1 exits hard after step K (a pod of the gang dying mid-run);
--per-rank-mean: the regression the suite guards against (each rank divides by its own token
count, then ranks are averaged), patched in to prove the equality test would catch it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from merit_trainer import training
from merit_trainer.stage import exit_process
from meritrun.stages import TrainParams


def per_rank_mean(original):
    def step(model, optimizer, micro, *, step_supervised, dist, **kwargs):
        local = sum(e.supervised for rows in micro for e in rows)
        return original(model, optimizer, micro, step_supervised=local * dist.world, dist=dist,
                        **kwargs)
    return step


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("params", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--die-after-step", type=int)
    parser.add_argument("--per-rank-mean", action="store_true")
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"rank{os.environ.get('RANK')} %(name)s: %(message)s")
    if args.per_rank_mean:
        training.train_step = per_rank_mean(training.train_step)

    def progress(step: int, total: int, loss: float) -> None:
        if step == args.die_after_step and os.environ.get("RANK") == "1":
            os._exit(17)

    params = TrainParams.model_validate_json(args.params.read_text())
    training.train_partition(params, workdir=args.workdir, progress=progress,
                             checkpoint_every=args.every)
    return 0


if __name__ == "__main__":
    exit_process(main())  # as the stage's ranks end
