"""`meritrun contribute` end to end: a site process fetches its assignment, trains the tiny
model on its own data, signs and uploads; bad local data uploads nothing; an interrupted run
(killed after a checkpoint, or with a half-done upload) resumes and completes. File storage
for speed, plus one run against SeaweedFS with a scoped grant and no other credentials.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.seaweed import SeaweedServer

from meritrun.access import offer_assignment, offer_partition
from meritrun.api import MeritRunSpec, PartitionStatus
from meritrun.artifacts import MANIFEST_NAME, PartitionManifest, RunId, checkpoint_prefix
from meritrun.assignment import build_sketch_assignment
from meritrun.data import iter_examples, write_examples
from meritrun.iam import IamIssuer
from meritrun.keys import generate_site_key
from meritrun.signing import verify_manifest_signature
from meritrun.storage import Storage, open_storage

RUN, SITE, DECLARED, UNDECLARED = RunId("mix", "u1"), "b", ["copy", "sort"], "upper"
FAST = {"batchSize": 8, "maxSeqLen": 64, "maxSteps": 3}


@dataclass
class Hub:
    spec: MeritRunSpec
    storage: Storage
    grant_file: Path
    output: str

    def manifest(self) -> PartitionManifest:
        return PartitionManifest.model_validate_json(
            self.storage.get_bytes(f"{self.output}/{MANIFEST_NAME}"))


def make_hub(tmp: Path, base: str, *, training: dict, public_key: str | None = None,
             storage: Storage | None = None, issuer=None) -> Hub:
    """A run whose partition p1 (copy + sort) waits for pull site b; its grant file."""
    storage = storage or open_storage((tmp / "store").as_uri())
    stor = {"uri": storage.root_uri, "endpoint": getattr(storage, "endpoint", None)}
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": base}, "storage": stor, "training": training,
        "data": {"sources": [{"name": s, "site": SITE} for s in DECLARED]
                 + [{"name": "reverse", "uri": "hub.jsonl"}]},
        "sites": [{"name": SITE, "mode": "pull", "deadlineSeconds": 3600,
                   "publicKey": public_key, "sketches": True}],
        "profiling": {"projectionDim": 64, "calibrationSamples": 4},
        "partitioning": {"strategy": "bySite"},
    })
    now = datetime.now(timezone.utc)
    part = PartitionStatus(name="p1", index=1, sources=DECLARED, site=SITE, attempt=1,
                           state="AwaitingContribution",
                           start_time=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    grant = offer_partition(RUN, spec, part, storage=storage, issuer=issuer, now=now)
    (tmp / "grant.json").write_text(grant.bundle_json())
    return Hub(spec, storage, tmp / "grant.json", "runs/mix/u1/partitions/p1/attempt-1")


def site_data(tiny_mixture, path: Path, sources: list[str]) -> Path:
    write_examples(path, [e for e in iter_examples(tiny_mixture.train) if e.source in sources])
    return path


def contribute_cmd(grant: Path, data: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meritrun.cli", "contribute", "--assignment", str(grant),
            "--data", str(data), "--workdir", str(workdir), *extra]


def site_env(**extra: str) -> dict[str, str]:
    """The site's environment: none of the hub's S3 settings, two torch threads at most."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "MERITRUN_S3_ENDPOINT"}
    return {**env, "MERITRUN_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def run_site(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=site_env(**env), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(autouse=True)
def in_process_site(monkeypatch, caplog):
    """`main()` run in this process: one torch thread, INFO logs, all restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("MERITRUN_TORCH_THREADS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def site_key(tmp_path):
    return tmp_path / "site.key", generate_site_key(tmp_path / "site.key")


def test_site_contributes_then_resumes_an_interrupted_upload(
        tiny_base, tiny_mixture, tmp_path, site_key, caplog, capsys):
    """In-process for speed; the S3 test below runs the site as a separate process."""
    from merit_trainer.contribute import main

    key_path, public = site_key
    hub = make_hub(tmp_path, str(tiny_base), training=FAST, public_key=public)
    data = site_data(tiny_mixture, tmp_path / "site.jsonl", [*DECLARED, UNDECLARED])
    cmd = contribute_cmd(hub.grant_file, data, tmp_path / "work", "--key", str(key_path))
    assert main(cmd[4:]) == 0
    assert "not trained on (undeclared): upper (40 examples)" in capsys.readouterr().out

    manifest = hub.manifest()
    verify_manifest_signature(manifest, public)
    assert (manifest.run, manifest.run_uid, manifest.partition, manifest.attempt,
            manifest.site) == (RUN.name, RUN.uid, "p1", 1, SITE)
    assert manifest.sources == DECLARED and manifest.tokens.supervised > 0
    assert manifest.site_data["examples"] == {"copy": 40, "sort": 40}
    assert manifest.site_data["ignored"] == {UNDECLARED: 40}
    assert manifest.training["seed"] == 1 and manifest.training["steps"] == 3
    # Exactly the listed files (the merge refuses anything unlisted), each matching its hash.
    listed = {f"{hub.output}/{rel}" for rel in manifest.files} | {f"{hub.output}/manifest.json"}
    assert set(hub.storage.list_keys(hub.output)) == listed
    assert {"model/model.safetensors", "optimizer_v.safetensors"} <= set(manifest.files)
    hub.storage.download_dir(hub.output, tmp_path / "fetched", expected=manifest.files)

    # An upload cut short: the manifest and the weights never arrived. Rerun: no training,
    # only the missing files go up, the same signed manifest last.
    store = Path(hub.storage.root_uri.removeprefix("file://")) / hub.output
    before = (store / MANIFEST_NAME).read_bytes()
    hub.storage.delete_prefix(f"{hub.output}/{MANIFEST_NAME}")
    hub.storage.delete_prefix(f"{hub.output}/model/model.safetensors")
    kept = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    caplog.clear()
    assert main(cmd[4:]) == 0
    assert "artifact already built" in caplog.text and "step 1/" not in caplog.text
    assert (store / MANIFEST_NAME).read_bytes() == before
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not sent again
    hub.storage.download_dir(hub.output, tmp_path / "again", expected=manifest.files)


def test_missing_declared_source_names_it_and_uploads_nothing(tiny_base, tiny_mixture,
                                                              tmp_path):
    hub = make_hub(tmp_path, str(tiny_base), training=FAST)
    data = site_data(tiny_mixture, tmp_path / "site.jsonl", ["copy", UNDECLARED])
    done = run_site(contribute_cmd(hub.grant_file, data, tmp_path / "work"), tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'sort'" in last and "'copy'" not in last
    assert "MERITRUN_ERROR" not in done.stderr and done.stderr.count(last) == 1
    assert hub.storage.list_keys("runs/mix/u1/partitions") == []
    assert not (tmp_path / "work" / "train").exists()  # failed before any training


def test_killed_after_a_checkpoint_resumes_and_completes(tiny_base, tiny_mixture, tmp_path,
                                                         caplog):
    from transformers import AutoTokenizer

    from merit_trainer.contribute import main
    from meritrun.textenc import encode_example

    training = {"batchSize": 4, "maxSeqLen": 64, "epochs": 2}  # 40 steps
    hub = make_hub(tmp_path, str(tiny_base), training=training)
    data = site_data(tiny_mixture, tmp_path / "site.jsonl", DECLARED)
    work = tmp_path / "work"
    cmd = contribute_cmd(hub.grant_file, data, work)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=site_env(MERITRUN_CHECKPOINT_STEPS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not any((work / "train" / "checkpoints").glob("*/step-*/meta.json")):
            assert proc.poll() is None, "the site process ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not hub.storage.exists(f"{hub.output}/{MANIFEST_NAME}")

    assert main(cmd[4:]) == 0
    assert "resuming from checkpoint" in caplog.text
    manifest = hub.manifest()
    assert manifest.training["steps"] == 40
    # Every token counted once, as in an uninterrupted run: 2 epochs over the 80 examples.
    tok = AutoTokenizer.from_pretrained(tiny_base)
    per_epoch = sum(encode_example(tok, ex, max_len=64).supervised
                    for ex in iter_examples(data))
    assert manifest.tokens.supervised == 2 * per_epoch


def test_sketch_only_uploads_comparable_sketches(tiny_base, tiny_mixture, tmp_path):
    from merit_trainer.contribute import main
    from merit_trainer.profiling import load_sketch_set

    hub = make_hub(tmp_path, str(tiny_base), training=FAST)
    assignment = build_sketch_assignment(RUN, hub.spec, SITE, attempt=1)
    grant = offer_assignment(assignment, storage=hub.storage, issuer=None,
                             expires=datetime.now(timezone.utc).replace(year=2100))
    (tmp_path / "sketch-grant.json").write_text(grant.bundle_json())
    data = site_data(tiny_mixture, tmp_path / "site.jsonl", DECLARED)
    args = ["--assignment", str(tmp_path / "sketch-grant.json"), "--data", str(data),
            "--workdir", str(tmp_path / "work")]
    assert main(args) == 2  # a sketch assignment trains nothing: --sketch-only is required
    assert main([*args, "--sketch-only"]) == 0
    hub.storage.download_dir(assignment.output, tmp_path / "got")
    sketches = load_sketch_set(tmp_path / "got" / "sketch")
    assert sketches.names == DECLARED and sketches.matrix.shape == (2, 64)
    assert sketches.settings["seed"] == hub.spec.profiling.seed


@pytest.fixture(scope="module")
def iam_server():
    with SeaweedServer(extra_args=["-s3.iam.readOnly=false"]) as server:
        yield server


def test_site_contributes_to_s3_with_only_its_scoped_grant(tiny_base, tiny_mixture, tmp_path,
                                                           site_key, iam_server):
    key_path, public = site_key
    bucket = iam_server.make_bucket()
    storage = open_storage(f"s3://{bucket}", endpoint=iam_server.endpoint, region="us-east-1",
                           access_key=iam_server.access_key, secret_key=iam_server.secret_key)
    storage.upload_dir(tiny_base, "models/base")
    issuer = IamIssuer(iam_server.endpoint, access_key=iam_server.access_key,
                       secret_key=iam_server.secret_key)
    hub = make_hub(tmp_path, f"s3://{bucket}/models/base", training=FAST, public_key=public,
                   storage=storage, issuer=issuer)
    data = site_data(tiny_mixture, tmp_path / "site.jsonl", DECLARED)
    done = run_site(contribute_cmd(hub.grant_file, data, tmp_path / "work", "--key",
                                   str(key_path), "--hub-checkpoints"), tmp_path,
                    MERITRUN_CHECKPOINT_STEPS="1")
    assert done.returncode == 0, done.stderr[-4000:]
    # Checkpoints went to the partition's prefix through the grant, and were removed after.
    assert done.stderr.count("kept in s3://") == 3  # maxSteps 3, one per step
    assert storage.list_keys(checkpoint_prefix(RUN, "p1")) == []
    manifest = hub.manifest()
    verify_manifest_signature(manifest, public)
    hub.storage.download_dir(hub.output, tmp_path / "fetched", expected=manifest.files)
    secret = iam_server.secret_key
    grant_secret = hub.grant_file.read_text().split('"secret_access_key": "')[1].split('"')[0]
    for text in (done.stdout, done.stderr):
        assert grant_secret not in text and secret not in text
