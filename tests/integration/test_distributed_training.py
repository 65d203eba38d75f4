"""The train stage under torchrun with 2 gloo processes (FSDP2) against one process.

Same tiny Qwen2, data and configuration: the sharded run must give the single-process weights
and Adam second moments (1e-5 relative) and the same token counts; a per-rank loss mean must
visibly break that; a gang member dying after step k must leave a checkpoint the next attempt
resumes to bit-identical weights, published once by rank 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merit_trainer.moments import compress_rank1, load_second_moments
from merit_trainer.training import train_partition
from meritrun.artifacts import RunId, checkpoint_prefix, read_manifest
from meritrun.stages import StorageParams, TrainParams

TESTS = Path(__file__).parents[1]
WORKER = "support.train_worker"  # as a module: tests/support/minio.py must not shadow minio
TRAINING = {"learningRate": 3e-3, "batchSize": 8, "microBatchSize": 2, "maxSeqLen": 48,
            "maxSteps": 6, "secondMoments": "rank1", "seed": 3, "warmupRatio": 0.2,
            "schedule": "cosine"}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Done:
    artifact: Path
    stderr: str


def make_params(tmp: Path, base: Path, data: Path, *, attempt: int = 1, **training) -> TrainParams:
    return TrainParams(
        run="dist", run_uid="u1", attempt=attempt, storage={"uri": (tmp / "store").as_uri()},
        base_model=str(base), output=f"runs/dist/p0/a{attempt}", partition="p0", index=0,
        sources=["copy", "sort", "reverse"], data={"uri": str(data)},
        training={**TRAINING, **training},
    )


def torchrun(tmp: Path, params: TrainParams, *args: str, check: bool = True,
             shard_bytes: int | None = None) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.json").write_text(params.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    if shard_bytes:
        env["MERITRUN_MAX_SHARD_BYTES"] = str(shard_bytes)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", WORKER, str(tmp / "params.json"), str(tmp / "work"), *args],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def moments(artifact: Path) -> dict:
    return load_second_moments(artifact / "optimizer_v.safetensors")[1]


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float, name: str) -> None:
    scale = b.abs().max().clamp(min=1e-30)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= rel, f"{name}: max relative difference {err:.2e} > {rel}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_base, tiny_mixture) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = make_params(tmp, tiny_base, tiny_mixture.train)
        train_partition(params, workdir=tmp / "work", checkpoint_every=2)
    finally:
        torch.set_num_threads(before)
    return tmp / "store" / params.output


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_base, tiny_mixture) -> Done:
    tmp = tmp_path_factory.mktemp("sharded")
    params = make_params(tmp, tiny_base, tiny_mixture.train)
    done = torchrun(tmp, params, shard_bytes=60_000)
    return Done(tmp / "store" / params.output, done.stderr)


def assert_same_training(one: Path, two: Path) -> None:
    """Weights and exp_avg_sq (rank-1 factors from shards vs from the whole v) to 1e-5."""
    w_one, w_two = weights(one / "model"), weights(two / "model")
    assert set(w_one) == set(w_two)
    for name in w_one:
        assert w_two[name].dtype == w_one[name].dtype == torch.float32  # the base's dtype
        if name.endswith("k_proj.bias"):
            # Its true gradient is 0 (softmax ignores a shift shared by all keys), so Adam
            # scales float noise of ~1e-10 up to lr-sized steps: not comparable, by nature.
            continue
        assert_rel_close(w_two[name], w_one[name], 1e-5, name)
    v_one, v_two = moments(one), moments(two)
    assert set(v_one) == set(v_two)
    for name, entry in v_one.items():
        pairs = zip(entry, v_two[name], strict=True) if isinstance(entry, tuple) else [
            (entry, v_two[name])]
        for a, b in pairs:
            assert_rel_close(b, a, 1e-5, name)


def test_fsdp2_two_processes_equal_one_process(single, sharded):
    assert_same_training(single, sharded.artifact)
    m_one, m_two = read_manifest(single), read_manifest(sharded.artifact)
    assert m_one.tokens == m_two.tokens
    assert (m_one.training["processes"], m_two.training["processes"]) == (1, 2)


def test_sharded_weights_files_follow_the_size_limit_and_load(sharded):
    from transformers import AutoModelForCausalLM

    model_dir = sharded.artifact / "model"
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((model_dir / f).stat().st_size <= 60_000 + 70_000 for f in files)
    assert (model_dir / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    saved = weights(model_dir)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert sharded.stderr.count("published to") == 1  # rank 0 alone uploads


def test_a_per_rank_mean_fails_the_equality_check(tmp_path, single, tiny_base, tiny_mixture):
    params = make_params(tmp_path, tiny_base, tiny_mixture.train)
    torchrun(tmp_path, params, "--per-rank-mean")
    bad = tmp_path / "store" / params.output
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same_training(single, bad)
    v_one, v_bad = moments(single), moments(bad)
    worst = max(abs(float(v_bad[n][2]) - float(e[2])) / float(e[2])
                for n, e in v_one.items() if isinstance(e, tuple) and float(e[2]) > 0)
    assert worst > 0.01, f"a per-rank mean moved sum(exp_avg_sq) by only {worst:.2%}"


def test_killed_gang_resumes_in_the_next_attempt(tmp_path, sharded, tiny_base, tiny_mixture):
    first = make_params(tmp_path, tiny_base, tiny_mixture.train, secondMoments="full")
    died = torchrun(tmp_path, first, "--die-after-step", "3", check=False)
    assert died.returncode != 0
    assert not list((tmp_path / "store").rglob("manifest.json"))
    steps = sorted(p.name for p in (tmp_path / "work" / "checkpoints").glob("*/step-*"))
    assert steps == ["step-00000002"]

    retry = make_params(tmp_path, tiny_base, tiny_mixture.train, attempt=2,
                        secondMoments="full")
    done = torchrun(tmp_path, retry)
    assert "resuming from checkpoint" in done.stderr
    artifact = tmp_path / "store" / retry.output
    resumed, uninterrupted = weights(artifact / "model"), weights(sharded.artifact / "model")
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)
    assert read_manifest(artifact).tokens == read_manifest(sharded.artifact).tokens
    assert done.stderr.count("published to") == 1
    assert not any((tmp_path / "work" / "checkpoints").glob("*/step-*"))  # removed after publish
    full, factors = moments(artifact), moments(sharded.artifact)
    for name, v in full.items():  # rank-1 from shards == rank-1 of the gathered full v
        if v.ndim >= 2:
            ref = compress_rank1(v)
            for key, got in zip(("row", "col", "total"), factors[name], strict=True):
                assert_rel_close(got, ref[key], 1e-6, f"{name}::{key}")


def test_a_gang_on_fresh_disks_resumes_from_storage(tmp_path, sharded, tiny_base, tiny_mixture,
                                                    s3_bucket, monkeypatch):
    """No work volume: the pods of the next attempt start on empty disks (also the nodes of
    a multi-node gang never share one), so the checkpoint comes back from S3."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    prefix = checkpoint_prefix(RunId("dist", "u1"), "p0")

    def attempt(n: int) -> TrainParams:
        return make_params(tmp_path, tiny_base, tiny_mixture.train, attempt=n).model_copy(
            update={"storage": StorageParams(uri=s3_bucket.root_uri,
                                             endpoint=s3_bucket.endpoint),
                    "checkpoints": prefix})

    storage = s3_bucket.open()
    died = torchrun(tmp_path / "pod-a1", attempt(1), "--die-after-step", "3", check=False)
    assert died.returncode != 0
    markers = [k for k in storage.list_keys(prefix) if k.endswith("/meta.json")]
    assert len(markers) == 1 and "/step-00000002/" in markers[0]
    shards = {k.rsplit("/", 1)[1] for k in storage.list_keys(markers[0].rsplit("/", 1)[0])}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= shards  # each rank sent its own

    retry = attempt(2)
    done = torchrun(tmp_path / "pod-a2", retry)  # an empty work directory
    assert "resuming from checkpoint" in done.stderr and "downloading checkpoint" in done.stderr
    artifact = storage.download_dir(retry.output, tmp_path / "fetched")
    resumed, uninterrupted = weights(artifact / "model"), weights(sharded.artifact / "model")
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)
    assert read_manifest(artifact).tokens == read_manifest(sharded.artifact).tokens
    assert storage.list_keys(prefix) == []  # removed after publishing
