"""Checkpoints kept in a real S3 server (SeaweedFS), for attempts that start on an empty disk.

On Kubernetes without a workVolume the work directory dies with the pod, so the next attempt
of a partition must resume from `runs/<run>/<uid>/partitions/<p>/checkpoints/` in storage:
to the same final weights as an uninterrupted run, ignoring a step whose marker never landed,
and leaving no checkpoint behind once the artifact is published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merit_trainer.checkpoint_mirror import META_NAME
from merit_trainer.training import train_partition
from meritrun.artifacts import RunId, checkpoint_prefix, partition_prefix, read_manifest
from meritrun.stages import TrainParams

RUN = RunId("ckpt", "u7")
TRAINING = {"learningRate": 3e-3, "batchSize": 4, "maxSeqLen": 48, "maxSteps": 7,
            "secondMoments": "rank1", "seed": 11}


class Preempted(Exception):
    pass


def make_params(root_uri: str, base: Path, data: Path, *, attempt: int, endpoint: str | None,
                checkpoints: bool = True) -> TrainParams:
    return TrainParams(
        run=RUN.name, run_uid=RUN.uid, attempt=attempt,
        storage={"uri": root_uri, "endpoint": endpoint}, base_model=str(base),
        output=partition_prefix(RUN, "p0", attempt), partition="p0", index=0,
        sources=["copy", "sort"], data={"uri": str(data)}, training=TRAINING,
        checkpoints=checkpoint_prefix(RUN, "p0") if checkpoints else None,
    )


def preempt_at(step: int):
    def progress(done: int, total: int, loss: float) -> None:
        if done == step:
            raise Preempted
    return progress


def weights(storage, output: str, dest: Path) -> dict[str, torch.Tensor]:
    local = storage.download_dir(f"{output}/model", dest)
    return load_file(str(local / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_base, tiny_mixture) -> Path:
    """The reference: the same training in one go, on local storage, no mirror."""
    tmp = tmp_path_factory.mktemp("reference")
    params = make_params((tmp / "store").as_uri(), tiny_base, tiny_mixture.train, attempt=1,
                         endpoint=None, checkpoints=False)
    train_partition(params, workdir=tmp / "work", checkpoint_every=0)
    return tmp / "store" / params.output


@pytest.fixture
def s3_env(monkeypatch, s3_bucket):
    """The stage's credentials come from its environment, as in a Job."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    monkeypatch.setenv("MERITRUN_TORCH_THREADS", "1")
    return s3_bucket


def _first(params: TrainParams, tmp: Path, *, stop_at: int) -> None:
    with pytest.raises(Preempted):
        train_partition(params, workdir=tmp / "pod-1", checkpoint_every=2,
                        progress=preempt_at(stop_at))


def _markers(storage) -> list[str]:
    return [k for k in storage.list_keys(checkpoint_prefix(RUN, "p0")) if k.endswith(META_NAME)]


def test_new_attempt_on_an_empty_disk_resumes_from_storage(tmp_path, s3_env, tiny_base,
                                                           tiny_mixture, uninterrupted):
    storage = s3_env.open()
    first = make_params(s3_env.root_uri, tiny_base, tiny_mixture.train, attempt=1,
                        endpoint=s3_env.endpoint)
    _first(first, tmp_path, stop_at=5)  # checkpoints at 2 and 4; only the newest is kept
    [marker] = _markers(storage)
    assert marker.endswith("/step-00000004/meta.json")
    assert json.loads(storage.get_bytes(marker))["step"] == 4
    assert not storage.exists(f"{first.output}/manifest.json")  # nothing published

    seen: list[int] = []
    retry = make_params(s3_env.root_uri, tiny_base, tiny_mixture.train, attempt=2,
                        endpoint=s3_env.endpoint)
    manifest = train_partition(retry, workdir=tmp_path / "pod-2",  # a fresh, empty disk
                               checkpoint_every=2, progress=lambda s, t, loss: seen.append(s))

    assert seen == [5, 6, 7]
    resumed = weights(storage, retry.output, tmp_path / "fetched")
    reference = load_file(str(uninterrupted / "model" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[n], reference[n]) for n in reference)
    assert manifest.tokens == read_manifest(uninterrupted).tokens
    assert storage.list_keys(checkpoint_prefix(RUN, "p0")) == []  # removed after publishing
    assert not list((tmp_path / "pod-2" / "checkpoints").rglob("*.distcp"))


def test_a_step_without_its_marker_is_ignored(tmp_path, s3_env, tiny_base, tiny_mixture):
    storage = s3_env.open()
    first = make_params(s3_env.root_uri, tiny_base, tiny_mixture.train, attempt=1,
                        endpoint=s3_env.endpoint)
    _first(first, tmp_path, stop_at=3)  # step 2 complete in storage
    [marker] = _markers(storage)
    complete = marker.rsplit("/", 1)[0]
    torn = complete.replace("step-00000002", "step-00000006")  # died before its marker
    for key in storage.list_keys(complete):
        if not key.endswith(META_NAME):
            storage.put_bytes(key.replace(complete, torn), storage.get_bytes(key))

    seen: list[int] = []
    retry = make_params(s3_env.root_uri, tiny_base, tiny_mixture.train, attempt=2,
                        endpoint=s3_env.endpoint)
    train_partition(retry, workdir=tmp_path / "pod-2", checkpoint_every=0,
                    progress=lambda s, t, loss: seen.append(s))
    assert seen[0] == 3  # from step 2, not from the torn step 6
    assert storage.list_keys(checkpoint_prefix(RUN, "p0")) == []  # the torn step too


def test_another_configuration_does_not_resume(tmp_path, s3_env, tiny_base, tiny_mixture):
    storage = s3_env.open()
    first = make_params(s3_env.root_uri, tiny_base, tiny_mixture.train, attempt=1,
                        endpoint=s3_env.endpoint)
    _first(first, tmp_path, stop_at=3)
    changed = first.model_copy(update={
        "attempt": 2, "output": partition_prefix(RUN, "p0", 2),
        "training": first.training.model_copy(update={"learning_rate": 1e-3})})
    seen: list[int] = []
    train_partition(changed, workdir=tmp_path / "pod-2", checkpoint_every=0,
                    progress=lambda s, t, loss: seen.append(s))
    assert seen[0] == 1
    assert _markers(storage) == []
