"""The merge and verify stages read partition artifacts and the base from S3 in place (real
MinIO): ranged reads pinned to the version first seen, bit-identical to the staged merge,
every input read at most twice, a corrupted byte refused with its file named, no local copy.
The streamed merge pass takes the fused kernels (`fusedscan` judges the update norms there)
where the staged one does."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from support.experts import make_experts, upload_to_bucket

from merit_merger import stage
from meritrun.api import MergeSpec, OtaSpec
from meritrun.errors import IntegrityError
from meritrun.stages import MergeParams, PartitionInput, StorageParams
from meritrun.storage import LocalStorage, S3Storage

RUN = "r1"
NAMES = ("p0", "p1", "p2")


def prefix(name: str) -> str:
    return f"runs/{RUN}/partitions/{name}/attempt-1"


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    # sharded experts: the base's tensor order crosses shard boundaries out of file order
    return make_experts(tmp_path_factory.mktemp("streamed"), tiny_base, 3, shard_bytes=400_000)


@pytest.fixture
def bucket(minio_bucket, pristine, tiny_base, monkeypatch):
    upload_to_bucket(minio_bucket, tiny_base, pristine.artifacts, prefix, monkeypatch)
    return minio_bucket


def merge_params(bucket, merge: MergeSpec, output: str) -> MergeParams:
    return MergeParams(
        run=RUN, run_uid="u1", attempt=1,
        storage=StorageParams(uri=bucket.root_uri, endpoint=bucket.endpoint),
        base_model=f"{bucket.root_uri}/models/base", output=output,
        partitions=[PartitionInput(name=p, prefix=prefix(p)) for p in NAMES], merge=merge)


def merged_weights(storage, output: str) -> dict[str, bytes]:
    keys = [k for k in storage.list_keys(f"{output}/model") if k.endswith(".safetensors")]
    return {k.rsplit("/", 1)[1]: storage.get_bytes(k) for k in keys}


def count_ranged_reads(monkeypatch) -> Counter:
    """Bytes read with ranged GETs, per object key."""
    counts: Counter = Counter()
    real = S3Storage.read_into

    def counting(self, key, offset, buf, *, tag=None):
        counts[key] += len(buf)
        return real(self, key, offset, buf, tag=tag)

    monkeypatch.setattr(S3Storage, "read_into", counting)
    return counts


def run_stage(bucket, merge: MergeSpec, output: str, workdir: Path, monkeypatch,
              inputs: str) -> dict:
    """The merge stage's report, its inputs staged or streamed (MERITRUN_INPUTS=`inputs`),
    its model written to `output`."""
    monkeypatch.setenv("MERITRUN_INPUTS", inputs)
    return stage.run_merge_stage(merge_params(bucket, merge, output), workdir=workdir)


def assert_same_weights(storage, staged: str, streamed: str) -> None:
    """The two outputs' merged shards are the same bytes (and there are some)."""
    want = merged_weights(storage, staged)
    assert want and merged_weights(storage, streamed) == want


def reads_over_twice(storage, counts: Counter) -> tuple[dict[str, int], dict[str, float]]:
    """The input weight files in storage (key -> bytes) and those read more than twice
    (key -> times read)."""
    inputs = {k: storage.version(k).bytes for k in storage.list_keys("")
              if k.endswith(".safetensors") and not k.startswith("out/")
              and not k.endswith("optimizer_v.safetensors")}
    return inputs, {k: counts[k] / size for k, size in inputs.items() if counts[k] > 2 * size}


def assert_same_verdicts(got: list[dict], want: list[dict]) -> None:
    """The reports' partitions agree; the update norms (and outlier ratios) to fp32 rounding:
    the streamed merge sums its units' squares in fp64 (fusedscan), the staged scan adds
    fp32 dots of the engine's blocks."""
    loose = ("update_norm", "outlier_ratio")
    assert [{**p, **dict.fromkeys(loose)} for p in got] == [
        {**p, **dict.fromkeys(loose)} for p in want]
    for key in loose:
        assert [p[key] for p in got] == [
            None if p[key] is None else pytest.approx(p[key], rel=1e-6) for p in want]


@pytest.mark.parametrize("merge", [
    MergeSpec(method="tokenWeighted"), MergeSpec(method="taskArithmetic", scale=0.7),
    MergeSpec(method="ota", ota=OtaSpec()), MergeSpec(method="ties", density=0.4)],
    ids=["token-weighted", "task-arithmetic", "ota", "ties"])
def test_streamed_merge_equals_the_staged_one_and_reads_each_input_twice_at_most(
        bucket, merge, tmp_path, monkeypatch):
    storage = bucket.open()
    staged = run_stage(bucket, merge, "out/staged", tmp_path / "staged", monkeypatch, "stage")
    counts = count_ranged_reads(monkeypatch)
    work = tmp_path / "streamed"
    streamed = run_stage(bucket, merge, "out/streamed", work, monkeypatch, "stream")

    assert streamed["included"] == staged["included"] == list(NAMES)
    assert streamed["io"]["kernel"] == staged["io"]["kernel"] == "fused"
    assert_same_weights(storage, "out/staged", "out/streamed")  # bit for bit
    # the report's verification is the same: norms judged in the merge pass
    assert_same_verdicts(streamed["partitions"], staged["partitions"])
    # no local copy of any input weight: only the merged model's own shards are on disk
    # (and rank-1 second moments, vectors the size of the dims, are downloaded whole)
    on_disk = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.safetensors"))
    assert any(p.startswith("merged/model/") for p in on_disk), on_disk
    assert all(p.startswith("merged/model/") or p.endswith("/optimizer_v.safetensors")
               for p in on_disk), on_disk
    # every input weight file read from storage, none more than twice (hash pass + merge)
    inputs, over = reads_over_twice(storage, counts)
    assert set(counts) == set(inputs)
    assert not over, over


def test_streamed_ties_holds_tensors_read_by_parallel_gets(bucket, tmp_path, monkeypatch):
    """TIES in small units: a tensor of several units is held in memory (`Merge.hold`), its
    experts' and base's GETs issued at once on the fetch pool like a unit's, never one after
    another on the pass's own threads; the same bytes as the staged merge."""
    import threading

    from merit_merger import fusedmerge, fusedreads

    merge = MergeSpec(method="ties", density=0.4)
    run_stage(bucket, merge, "out/staged-ties", tmp_path / "staged", monkeypatch, "stage")
    monkeypatch.setattr(fusedmerge, "REMOTE_UNIT_ELEMENTS", 1000)
    threads: Counter = Counter()
    real_read, real_hold = S3Storage.read_into, fusedreads.hold
    held: list[str] = []

    def read_into(self, key, offset, buf, *, tag=None):
        threads[threading.current_thread().name.rsplit("_", 1)[0]] += 1
        return real_read(self, key, offset, buf, tag=tag)

    def hold(pool, t, *args, **kwargs):
        held.append(t.name)
        return real_hold(pool, t, *args, **kwargs)
    monkeypatch.setattr(S3Storage, "read_into", read_into)
    monkeypatch.setattr(fusedreads, "hold", hold)
    streamed = run_stage(bucket, merge, "out/streamed-ties", tmp_path / "streamed",
                         monkeypatch, "stream")
    assert streamed["io"]["kernel"] == "fused" and held
    assert threads["merge-get"] > 0 and threads["merge-fused"] == 0, threads
    assert_same_weights(bucket.open(), "out/staged-ties", "out/streamed-ties")


def test_streamed_ties_fetches_a_large_tensor_once(bucket, tmp_path, monkeypatch):
    """TIES reads a tensor too large to hold three times (two threshold scans, the merge);
    from storage it is held on a mapped scratch file instead (`Merge.spill`), so every input
    byte is still fetched at most twice (the verify pass, the merge pass), and the bytes
    equal the staged merge's, which scans its local copies three times."""
    from merit_merger import fusedmerge, fusedreads, fusedtiesplan

    merge = MergeSpec(method="ties", density=0.4)
    monkeypatch.setattr(fusedtiesplan, "HOLD_BLOCKS", 0)  # every tensor of several units
    run_stage(bucket, merge, "out/staged-big", tmp_path / "staged", monkeypatch, "stage")
    monkeypatch.setattr(fusedmerge, "REMOTE_UNIT_ELEMENTS", 1000)
    counts = count_ranged_reads(monkeypatch)
    spilled: list[int] = []
    real_spill = fusedreads.spill

    def spill(scratch, sizes):
        spilled.append(sum(sizes))
        return real_spill(scratch, sizes)
    monkeypatch.setattr(fusedreads, "spill", spill)
    streamed = run_stage(bucket, merge, "out/streamed-big", tmp_path / "streamed",
                         monkeypatch, "stream")
    assert streamed["io"]["kernel"] == "fused" and len(spilled) > 3
    storage = bucket.open()
    assert_same_weights(storage, "out/staged-big", "out/streamed-big")
    inputs, over = reads_over_twice(storage, counts)
    assert set(counts) >= set(inputs) and not over, over


def test_streamed_ffg_equals_the_staged_one(bucket, tmp_path, monkeypatch):
    """OTA with FFG masks streamed: its two threshold scans (fusedffg) read from storage
    too; the same bytes, thresholds, kept fractions and fallbacks as the staged merge."""
    merge = MergeSpec(method="ota", ota=OtaSpec(density=0.3))
    staged = run_stage(bucket, merge, "out/staged-ffg", tmp_path / "staged", monkeypatch,
                       "stage")
    streamed = run_stage(bucket, merge, "out/streamed-ffg", tmp_path / "streamed",
                         monkeypatch, "stream")
    assert streamed["io"]["kernel"] == staged["io"]["kernel"] == "fused"
    assert_same_weights(bucket.open(), "out/staged-ffg", "out/streamed-ffg")
    thresholds = [p["ffg_threshold"] for p in staged["partitions"]]
    assert all(t is not None for t in thresholds)
    assert [p["ffg_threshold"] for p in streamed["partitions"]] == thresholds
    masks = ("numel", "kept_fraction", "fallback_elements")
    assert ({n: {k: t.get(k) for k in masks} for n, t in streamed["tensors"].items()}
            == {n: {k: t.get(k) for k in masks} for n, t in staged["tensors"].items()})


def test_a_corrupted_byte_in_a_remote_shard_is_refused_by_name_and_the_rest_merge(
        bucket, pristine, tmp_path, monkeypatch):
    storage = bucket.open()
    monkeypatch.setenv("MERITRUN_INPUTS", "stream")
    shard = sorted((pristine.artifacts[1] / "model").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight, mid-file: still a finite number
    rel = f"model/{shard.name}"
    storage.put_bytes(f"{prefix('p1')}/{rel}", bytes(data))
    p = merge_params(bucket, MergeSpec(method="tokenWeighted", quorum=0.5), "out/m")
    report = stage.run_merge_stage(p, workdir=tmp_path / "w")
    assert [(r["partition"], r["check"]) for r in report["refused"]] == [("p1", "sha256")]
    assert rel in report["refused"][0]["detail"]
    assert report["included"] == ["p0", "p2"]
    assert "out/m/model/config.json" in storage.list_keys("out/m")


def test_the_verify_stage_streams_too(bucket, pristine, tmp_path, monkeypatch):
    from meritrun.artifacts import VERDICT_NAME
    from meritrun.stages import Verdict, VerifyParams

    storage = bucket.open()
    monkeypatch.setenv("MERITRUN_INPUTS", "stream")
    counts = count_ranged_reads(monkeypatch)

    def judge(name: str) -> Verdict:
        params = VerifyParams(
            run=RUN, run_uid="u1", attempt=1,
            storage=StorageParams(uri=bucket.root_uri, endpoint=bucket.endpoint),
            base_model=f"{bucket.root_uri}/models/base", output=f"verdicts/{name}",
            merge=MergeSpec(), partition=PartitionInput(name=name, prefix=prefix(name)))
        stage.run_verify_stage(params, workdir=tmp_path / name)
        return Verdict.model_validate_json(storage.get_bytes(f"verdicts/{name}/{VERDICT_NAME}"))

    assert judge("p0").accepted
    expert = [k for k in counts if k.startswith(prefix("p0"))]
    assert expert and all(counts[k] <= storage.version(k).bytes + (64 << 10) for k in expert)
    shard = sorted((pristine.artifacts[2] / "model").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    storage.put_bytes(f"{prefix('p2')}/model/{shard.name}", bytes(data))
    refused = judge("p2")
    assert not refused.accepted and refused.check == "sha256" and shard.name in refused.detail
    assert not list((tmp_path / "p0").rglob("model*.safetensors"))  # base and expert weights


@pytest.mark.parametrize("kind", ["local", "minio"])
def test_ranged_reads_are_pinned_to_the_version_first_seen(kind, minio_bucket, tmp_path):
    storage = (LocalStorage(tmp_path / "root") if kind == "local"
               else minio_bucket.open())
    storage.put_bytes("a/obj", bytes(range(256)) * 40)
    v = storage.version("a/obj")
    assert v.bytes == 10240
    buf = bytearray(100)
    storage.read_into("a/obj", 5000, memoryview(buf), tag=v.tag)
    assert bytes(buf) == (bytes(range(256)) * 40)[5000:5100]
    with pytest.raises(IntegrityError, match="shorter"):
        storage.read_into("a/obj", 10200, memoryview(bytearray(100)), tag=v.tag)
    storage.put_bytes("a/obj", b"x" * 10240)  # same size, new bytes: a new version
    with pytest.raises(IntegrityError, match="changed"):
        storage.read_into("a/obj", 0, memoryview(bytearray(10)), tag=v.tag)


def test_an_outlier_refused_after_the_merge_pass_is_merged_away_before_publishing(
        bucket, pristine, tiny_base, tmp_path, monkeypatch):
    """The update norms are judged in the merge pass: a refused outlier means the output is
    built again from the others, and equals the staged merge that refused it up front."""
    from support.experts import edit_state, load_state

    storage = bucket.open()
    base = load_state(tiny_base)
    outlier = Path(shutil.copytree(pristine.artifacts[2], tmp_path / "p2"))

    def blow_up(state):
        for n, t in state.items():
            state[n] = base[n] + 20 * (t - base[n])
    edit_state(outlier, blow_up)
    storage.delete_prefix(prefix("p2"))
    storage.upload_dir(outlier, prefix("p2"))
    spec = MergeSpec(method="tokenWeighted", quorum=0.5, refuse_outliers=True)
    staged = run_stage(bucket, spec, "out/staged", tmp_path / "staged", monkeypatch, "stage")
    streamed = run_stage(bucket, spec, "out/streamed", tmp_path / "streamed", monkeypatch,
                         "stream")
    for report in (staged, streamed):
        assert [(r["partition"], r["check"]) for r in report["refused"]] == [
            ("p2", "outlier-norm")]
        assert report["included"] == ["p0", "p1"] and report["io"]["kernel"] == "fused"
    assert_same_verdicts(streamed["partitions"], staged["partitions"])
    assert merged_weights(storage, "out/streamed") == merged_weights(storage, "out/staged")


def open_streamed(bucket, names, dest: Path):
    """As the stage opens them: the base and partitions' small files downloaded, their
    weight files mounted; (base dir, sources, mounts)."""
    from merit_merger.fetch import open_base, open_partition

    storage = bucket.open()
    base_dir, mounts = open_base(f"{bucket.root_uri}/models/base", dest / "cache",
                                 endpoint=bucket.endpoint, region=None)
    sources = []
    for name in names:
        source, more = open_partition(storage, name, prefix(name), dest / name)
        sources.append(source)
        mounts |= more
    return base_dir, sources, mounts


def test_the_fused_pass_reads_units_from_storage_and_refuses_a_nan_by_name(
        bucket, pristine, tiny_base, tmp_path, monkeypatch):
    """Many small units (1000 elements), each read with ranged GETs: the output equals
    the merge of the same files on disk byte for byte; a NaN in one expert's tensor is
    refused by the merge pass's own judgment (not the verify pass: merge_models is called
    directly), naming the partition and the tensor."""
    from support.experts import edit_state

    from merit_merger import fusedmerge
    from merit_merger.engine import merge_models
    from merit_merger.remote import mounted
    from merit_merger.sources import PartitionSource
    from merit_merger.verification import NormScan
    from meritrun.errors import ContributionRejected

    spoiled = Path(shutil.copytree(pristine.artifacts[1], tmp_path / "spoiled"))
    tensor = "model.layers.0.mlp.up_proj.weight"

    def nan(state):
        state[tensor].view(-1)[state[tensor].numel() // 2] = float("nan")
    edit_state(spoiled, nan)
    storage = bucket.open()
    storage.delete_prefix(prefix("p1"))
    storage.upload_dir(spoiled, prefix("p1"))
    base_dir, sources, mounts = open_streamed(bucket, NAMES, tmp_path / "w")
    monkeypatch.setattr(fusedmerge, "REMOTE_UNIT_ELEMENTS", 1000)
    run = dict(base_dir=base_dir, method="token-weighted", shard_size_bytes=300_000,
               chunk_elements=1000, threads=2)
    with mounted(mounts):
        scan = NormScan([s.name for s in sources[::2]], raise_refusals=True)
        got = merge_models(partitions=sources[::2], out_dir=tmp_path / "s3", observe=scan,
                           **run)
        with pytest.raises(ContributionRejected) as refused:
            merge_models(partitions=sources, out_dir=tmp_path / "bad", **run,
                         observe=NormScan([s.name for s in sources], raise_refusals=True))
    assert got.kernel == "fused" and got.bytes_read > 0
    assert (refused.value.partition, refused.value.check) == ("p1", "non-finite")
    assert tensor in refused.value.detail
    assert all(scan.norms()[tensor][p] > 0 for p in ("p0", "p2"))
    local = [PartitionSource(p, a / "model", t) for p, a, t in
             zip(NAMES, pristine.artifacts, pristine.tokens, strict=True)][::2]
    want = merge_models(partitions=local, out_dir=tmp_path / "local", **(run | {
        "base_dir": tiny_base}))
    assert want.kernel == "fused"
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors*"))
    assert len(shards) > 2 and shards == sorted(
        p.name for p in (tmp_path / "s3").glob("*.safetensors*"))
    for name in shards:
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


STAGE = """
import json, sys

from merit_merger.stage import main

code = main(["merge", "--params", sys.argv[1], "--workdir", sys.argv[2]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def test_the_streamed_stage_verifies_and_merges_without_torch(bucket, tmp_path):
    """A fresh process: the verify pass (hash and values of every file, in ranged GETs), the
    fused merge pass with its norm scan, the report and the upload import no torch."""
    import json
    import os
    import subprocess
    import sys

    params = tmp_path / "params.json"
    params.write_text(merge_params(bucket, MergeSpec(method="tokenWeighted"),
                                   "out/fresh").model_dump_json())
    done = subprocess.run([sys.executable, "-c", STAGE, str(params), str(tmp_path / "w")],
                          env=os.environ | {"MERITRUN_INPUTS": "stream"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": False}
    report = json.loads(bucket.open().get_bytes("out/fresh/merge_report.json"))
    assert report["included"] == list(NAMES) and report["io"]["kernel"] == "fused"
