"""`merit_trainer.launch`: torchrun that keeps the stage's verdict.

torchrun itself exits 1 whatever its ranks said, and its failure report buries their error
line; a multi-GPU pod's bad spec or bad data would then be retried as a crash. Real torchrun,
real ranks of the train stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from merit_trainer.launch import gang_verdict
from meritrun.artifacts import RunId, partition_prefix
from meritrun.errors import ExitCode
from meritrun.stages import TrainParams

TIMEOUT_S = 240


def launch(tmp_path, params: TrainParams, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.json").write_text(params.model_dump_json())
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))}
    full.update(HF_HUB_OFFLINE="1", MERITRUN_TORCH_THREADS="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "merit_trainer.launch", "--standalone", "--nproc_per_node", "2",
         "-m", "merit_trainer.stage", "train", "--params", str(tmp_path / "params.json"),
         "--workdir", str(tmp_path / "work")],
        env=full, capture_output=True, text=True, timeout=TIMEOUT_S)


def params(tmp_path, base, data, sources: list[str]) -> TrainParams:
    return TrainParams(
        run="r", run_uid="u1", attempt=1, partition="p0", index=0, sources=sources,
        storage={"uri": (tmp_path / "store").as_uri()}, base_model=str(base),
        output=partition_prefix(RunId("r", "u1"), "p0", 1), data={"uri": str(data)},
        training={"maxSteps": 1, "batchSize": 2, "maxSeqLen": 32})


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_gpus_the_image_cannot_use_are_refused_before_any_rank_starts(tmp_path, tiny_base,
                                                                      tiny_mixture):
    done = launch(tmp_path, params(tmp_path, tiny_base, tiny_mixture.train, ["copy"]),
                  MERITRUN_GPUS="2", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == ExitCode.INVALID_SPEC, done.stderr[-2000:]
    assert last_line(done).startswith(
        'MERITRUN_ERROR: spec.template.resources.limits["nvidia.com/gpu"]: 2 GPU(s)')
    assert "torch.distributed" not in done.stderr  # no rank was started


def test_a_ranks_permanent_failure_survives_torchrun(tmp_path, tiny_base, tiny_mixture):
    done = launch(tmp_path, params(tmp_path, tiny_base, tiny_mixture.train,
                                   ["copy", "no-such-source"]))
    assert done.returncode == ExitCode.PERMANENT, done.stderr[-3000:]
    line = last_line(done)  # the stage's reason, not torchrun's report, is the last line
    assert line.startswith("MERITRUN_ERROR: ") and "'no-such-source'" in line


def test_the_most_decisive_rank_speaks_for_the_gang(tmp_path):
    for rank, (code, reason) in enumerate([(1, "bug"), (5, "spec.x: no"), (4, "bad data")]):
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps({"code": code,
                                                                "reason": reason}))
    assert gang_verdict(tmp_path) == (5, "spec.x: no")
    assert gang_verdict(tmp_path / "none") is None
