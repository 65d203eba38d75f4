"""The count-sketch of sharded tensors: each of 2 gloo ranks sketches its Shard(0) rows with
their global indices, the sum over ranks is the sketch of the whole tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from merit_trainer.profiling.sketch import CountSketch

TESTS = Path(__file__).parents[1]


def test_sharded_sketch_all_reduced_equals_the_unsharded_sketch(tmp_path):
    from support.sketch_worker import DIM, tensors

    out = tmp_path / "sketch.pt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "support.sketch_worker", str(out)],  # a module: support/minio.py shadows minio
        env={**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    sketch = CountSketch(DIM, seed=3)
    whole = torch.zeros(DIM, dtype=torch.float64)
    for name, t in tensors().items():
        sketch.add(whole, name, t)
    torch.testing.assert_close(torch.load(out), whole, rtol=1e-6, atol=1e-6)
    assert whole.abs().sum() > 0


def test_hashes_depend_only_on_seed_name_and_global_index():
    from merit_trainer.profiling.sketch import element_hashes, tensor_key

    key = tensor_key(3, "w")
    whole = element_hashes(key, 0, 1000, 64)
    assert torch.equal(torch.cat([element_hashes(key, 0, 400, 64),
                                  element_hashes(key, 400, 600, 64)]), whole)
    assert not torch.equal(element_hashes(tensor_key(3, "v"), 0, 1000, 64), whole)
    buckets, signs = whole >> 1, whole & 1
    assert int(buckets.min()) >= 0 and int(buckets.max()) < 64
    assert 400 < int(signs.sum()) < 600 and len(torch.unique(buckets)) == 64


def test_profiling_in_bf16_with_checkpointing_keeps_the_fp32_cosines(tiny_base, tiny_mixture):
    from merit_trainer.profiling import profile_sketches
    from meritrun.api import ProfilingSpec
    from meritrun.data import read_examples

    by_source: dict = {}
    for e in read_examples([tiny_mixture.train]):
        by_source.setdefault(e.source, []).append(e)
    base = {"calibrationSamples": 6, "stride": 1, "projectionDim": 256, "parameters": "all"}
    fp32 = profile_sketches(tiny_base, by_source, ProfilingSpec(**base), max_seq_len=64)
    low = profile_sketches(tiny_base, by_source, ProfilingSpec(
        **base, precision="bf16", gradientCheckpointing=True), max_seq_len=64)
    assert low.settings["precision"] == "bf16"
    unit = lambda m: m / (m ** 2).sum(1, keepdims=True) ** 0.5  # noqa: E731
    cos32, cos16 = unit(fp32.matrix) @ unit(fp32.matrix).T, unit(low.matrix) @ unit(low.matrix).T
    assert abs(cos32 - cos16).max() < 0.05
