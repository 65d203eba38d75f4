"""The trainer image's entry point, run the way a backend runs it.

The success case is a real subprocess against a real S3 server (SeaweedFS): base model and data
are fetched from the bucket, the artifact is uploaded there with credentials taken only from
the environment, and the result is verified the way the merger verifies it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merit_trainer.stage import main
from meritrun.artifacts import (
    MANIFEST_NAME,
    PartitionManifest,
    RunId,
    partition_prefix,
    plan_prefix,
)
from meritrun.errors import ExitCode
from meritrun.stages import Plan, ProfileParams, TrainParams

TIMEOUT_S = 180


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))}
    env.update(HF_HUB_OFFLINE="1", MERITRUN_TORCH_THREADS="1", **extra)
    return env


def run_stage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merit_trainer.stage", *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("MERITRUN_ERROR: "), stderr[-2000:]
    return lines[-1]


def test_train_stage_subprocess_against_s3(tmp_path, s3_bucket, tiny_base, tiny_mixture):
    storage = s3_bucket.open()
    storage.upload_dir(tiny_base, "models/base")
    storage.put_file("data/train.jsonl", tiny_mixture.train)
    output = partition_prefix(RunId("s3run", "u1"), "p0", 2)
    params = TrainParams(
        run="s3run", run_uid="u1", attempt=2, partition="p0", index=0, sources=["reverse"],
        storage={"uri": s3_bucket.root_uri, "endpoint": s3_bucket.endpoint},
        base_model=f"{s3_bucket.root_uri}/models/base", output=output,
        data={"uri": f"{s3_bucket.root_uri}/data/train.jsonl"},
        training={"maxSteps": 3, "batchSize": 8, "maxSeqLen": 64, "secondMoments": "rank1"},
    )
    params_path = tmp_path / "params.json"
    params_path.write_text(params.model_dump_json())
    env = _env(AWS_ACCESS_KEY_ID=s3_bucket.access_key, AWS_SECRET_ACCESS_KEY=s3_bucket.secret_key)

    done = run_stage("train", "--params", str(params_path), env=env)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "MERITRUN_ERROR" not in done.stderr
    manifest = PartitionManifest.model_validate_json(
        storage.get_bytes(f"{output}/{MANIFEST_NAME}"))
    assert (manifest.attempt, manifest.sources, manifest.training["steps"]) == (2, ["reverse"], 3)
    assert manifest.second_moments is not None and manifest.second_moments.kind == "rank1"
    local = storage.download_dir(output, tmp_path / "fetched", expected=manifest.files)
    assert (local / "model" / "model.safetensors").is_file()
    assert json.loads((local / "train_log.json").read_text())["steps"] == 3


def test_invalid_params_exit_nonzero_with_an_error_line(tmp_path):
    params_path = tmp_path / "params.json"
    params_path.write_text(json.dumps({"run": "r", "run_uid": "u1", "attempt": 0,
                                       "stage": "train"}))

    done = run_stage("train", "--params", str(params_path), "--workdir", str(tmp_path / "w"),
                     env=_env())

    assert done.returncode == ExitCode.PERMANENT  # retrying the same params cannot help
    line = error_line(done.stderr)
    assert "attempt" in line and str(params_path) in line


def test_missing_source_is_reported_by_name(tmp_path, tiny_base, tiny_mixture, capfd):
    params = TrainParams(
        run="r", run_uid="u1", attempt=1, partition="p3", index=3,
        sources=["copy", "no-such-source"],
        storage={"uri": (tmp_path / "store").as_uri()}, base_model=str(tiny_base),
        output=partition_prefix(RunId("r", "u1"), "p3", 1), data={"uri": str(tiny_mixture.train)},
        training={"maxSteps": 1},
    )
    (tmp_path / "params.json").write_text(params.model_dump_json())

    code = main(["train", "--params", str(tmp_path / "params.json"),
                 "--workdir", str(tmp_path / "w")])

    assert code == ExitCode.PERMANENT
    assert "'no-such-source'" in error_line(capfd.readouterr().err)
    assert not (tmp_path / "store").exists()


def test_gpus_the_image_cannot_use_fail_as_an_invalid_spec(tmp_path, tiny_base, tiny_mixture):
    """The pod asks for a GPU (the Job renderer sets MERITRUN_GPUS from the template) but
    torch sees no CUDA: exit INVALID_SPEC, which the backends turn into InvalidSpec."""
    params = TrainParams(
        run="r", run_uid="u1", attempt=1, partition="p0", index=0, sources=["copy"],
        storage={"uri": (tmp_path / "store").as_uri()}, base_model=str(tiny_base),
        output=partition_prefix(RunId("r", "u1"), "p0", 1), data={"uri": str(tiny_mixture.train)},
        training={"maxSteps": 1},
    )
    (tmp_path / "params.json").write_text(params.model_dump_json())

    done = run_stage("train", "--params", str(tmp_path / "params.json"),
                     "--workdir", str(tmp_path / "w"),
                     env=_env(MERITRUN_GPUS="1", CUDA_VISIBLE_DEVICES=""))

    assert done.returncode == ExitCode.INVALID_SPEC
    line = error_line(done.stderr)
    assert 'spec.template.resources.limits["nvidia.com/gpu"]' in line and "1 GPU(s)" in line
    assert not (tmp_path / "store").exists()


def test_unreadable_params_file_fails_before_loading_anything(capfd):
    code = main(["profile", "--params", "/nonexistent/params.json"])

    assert code == ExitCode.PERMANENT
    assert "cannot read /nonexistent/params.json" in error_line(capfd.readouterr().err)


def test_usage_error_also_ends_with_an_error_line(capfd):
    with pytest.raises(SystemExit) as exited:
        main(["train"])

    assert exited.value.code == ExitCode.PERMANENT
    assert "--params" in error_line(capfd.readouterr().err)


@pytest.fixture
def restore_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_workdir_default_comes_from_the_environment(tmp_path, tiny_base, tiny_mixture,
                                                   monkeypatch, restore_torch_threads):
    params = TrainParams(
        run="r", run_uid="u1", attempt=1, partition="p0", index=0, sources=["copy"],
        storage={"uri": str(tmp_path / "store")}, base_model=str(tiny_base),
        output=partition_prefix(RunId("r", "u1"), "p0", 1), data={"uri": str(tiny_mixture.train)},
        training={"maxSteps": 2, "secondMoments": "none", "maxSeqLen": 64},
    )
    (tmp_path / "params.json").write_text(params.model_dump_json())
    monkeypatch.setenv("MERITRUN_WORKDIR", str(tmp_path / "envwork"))
    monkeypatch.setenv("MERITRUN_TORCH_THREADS", "1")

    assert main(["train", "--params", str(tmp_path / "params.json")]) == 0

    assert (tmp_path / "envwork" / "artifact" / "train_log.json").is_file()
    published = Path(tmp_path / "store" / params.output)
    manifest = PartitionManifest.model_validate_json((published / MANIFEST_NAME).read_text())
    assert manifest.second_moments is None and "optimizer_v.safetensors" not in manifest.files


def test_profile_subcommand_runs_the_profile_stage(tmp_path, tiny_base, tiny_mixture,
                                                   monkeypatch, restore_torch_threads):
    params = ProfileParams(
        run="r", run_uid="u1", attempt=1, storage={"uri": (tmp_path / "store").as_uri()},
        base_model=str(tiny_base), output=plan_prefix(RunId("r", "u1"), 1),
        data={"uri": str(tiny_mixture.train)},
        profiling={"calibrationSamples": 4, "stride": 1, "projectionDim": 64},
        partitioning={"strategy": "conflictPCA", "axes": 1},
    )
    (tmp_path / "params.json").write_text(params.model_dump_json())
    monkeypatch.setenv("MERITRUN_TORCH_THREADS", "1")

    code = main(["profile", "--params", str(tmp_path / "params.json"),
                 "--workdir", str(tmp_path / "w")])

    assert code == 0
    plan = Plan.model_validate_json((tmp_path / "store" / params.output / "plan.json").read_text())
    assert len(plan.partitions) == 2
    assert sorted(s for p in plan.partitions for s in p.sources) == sorted(tiny_mixture.sources)
