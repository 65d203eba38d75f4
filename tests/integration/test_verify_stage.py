"""The verify stage end to end: one arriving contribution judged through
`python -m merit_merger.stage verify`, on a file:// root and on real SeaweedFS S3.

Each bad artifact is a real tiny model with a real manifest, signed by the site's ed25519
key (unless the case is about the signature), so the refusal names exactly the one check
it breaks; the verdict is read back from the verdict prefix, outside the site's prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.experts import load_state, make_experts, refresh_manifest, save_state

from merit_merger import stage
from meritrun.api import MergeSpec
from meritrun.artifacts import (
    MANIFEST_NAME,
    VERDICT_NAME,
    RunId,
    partition_prefix,
    read_manifest,
    sha256_file,
    verdict_prefix,
    write_manifest,
)
from meritrun.errors import ExitCode
from meritrun.signing import public_key_b64, sign_manifest
from meritrun.stages import PartitionInput, StorageParams, Verdict, VerifyParams

RUN, PART, ATTEMPT, SITE = RunId("r1", "u1"), "p1", 2, "site-b"
PREFIX = partition_prefix(RUN, PART, ATTEMPT)
OUTPUT = verdict_prefix(RUN, PART, ATTEMPT)
WEIGHTS = "model/model.safetensors"


@dataclass(frozen=True)
class Kit:
    """The base, the site's key, and pristine artifacts (signed contribution, other base)."""

    base: Path
    key: Ed25519PrivateKey
    good: Path
    foreign: Path  # trained from another base, otherwise a valid signed contribution


def sign(artifact: Path, key: Ed25519PrivateKey, **updates: object) -> None:
    """Re-hash the files, set manifest fields, sign as the site does before uploading."""
    refresh_manifest(artifact, **updates)
    write_manifest(artifact, sign_manifest(read_manifest(artifact), key))


def as_contribution(artifact: Path, key: Ed25519PrivateKey) -> Path:
    sign(artifact, key, run=RUN.name, run_uid=RUN.uid, partition=PART, attempt=ATTEMPT, site=SITE)
    return artifact


@pytest.fixture(scope="module")
def kit(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    from merit_trainer.tiny import save_tiny_base

    root, key = tmp_path_factory.mktemp("verify-kit"), Ed25519PrivateKey.generate()
    good = make_experts(root / "good", tiny_base, 1).artifacts[0]
    other = save_tiny_base(root / "other-base", seed=1)
    foreign = make_experts(root / "foreign", other, 1).artifacts[0]
    return Kit(tiny_base, key, as_contribution(good, key), as_contribution(foreign, key))


def verify_params(root_uri: str, base_uri: str, *, public_key: str | None,
                  site: str | None = SITE, merge: MergeSpec | None = None,
                  **storage: str) -> VerifyParams:
    return VerifyParams(
        run=RUN.name, run_uid=RUN.uid, attempt=ATTEMPT,
        storage=StorageParams(uri=root_uri, **storage),
        base_model=base_uri, output=OUTPUT, merge=merge or MergeSpec(),
        partition=PartitionInput(name=PART, prefix=PREFIX, site=site, public_key=public_key,
                                 run_uid=RUN.uid))


def run_main(params: VerifyParams, tmp_path: Path) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "verify.json"
    path.write_text(params.model_dump_json())
    return stage.main(["verify", "--params", str(path), "--workdir", str(tmp_path / "work")])


@pytest.fixture
def store(kit: Kit, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(kit.base, root / "models" / "base")
    return root


def upload(store: Path, artifact: Path) -> Path:
    return Path(shutil.copytree(artifact, store / PREFIX))


def judge(store: Path, tmp_path: Path, public_key: str | None, **kwargs) -> Verdict:
    params = verify_params(store.as_uri(), (store / "models" / "base").as_uri(),
                           public_key=public_key, **kwargs)
    assert run_main(params, tmp_path) == 0  # a refusal is a verdict, not a failure
    return Verdict.model_validate_json((store / OUTPUT / VERDICT_NAME).read_text())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # same size, one byte different
    path.write_bytes(bytes(data))


def poison(artifact: Path, key: Ed25519PrivateKey) -> None:
    state = load_state(artifact / "model")
    state["model.layers.0.self_attn.q_proj.weight"][2, 3] = float("nan")
    save_state(artifact / "model", state)
    sign(artifact, key)  # honestly hashed and signed: only the values are wrong


def test_good_contribution_is_accepted_through_the_subprocess(kit, store, tmp_path):
    upload(store, kit.good)
    params = verify_params(store.as_uri(), (store / "models" / "base").as_uri(),
                           public_key=public_key_b64(kit.key))
    (tmp_path / "p.json").write_text(params.model_dump_json())
    proc = subprocess.run(
        [sys.executable, "-m", "merit_merger.stage", "verify", "--params",
         str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = Verdict.model_validate_json((store / OUTPUT / VERDICT_NAME).read_text())
    assert verdict.accepted and verdict.check is None and verdict.detail is None
    assert (verdict.partition, verdict.attempt) == (PART, ATTEMPT)
    assert verdict.manifest_sha256 == sha256_file(store / PREFIX / MANIFEST_NAME)
    assert "verdict: partition p1 attempt 2 accepted" in proc.stderr
    assert "MERITRUN_ERROR" not in proc.stderr


def other_key_signs(artifact: Path, kit: Kit) -> None:
    sign(artifact, Ed25519PrivateKey.generate())


def unsigned(artifact: Path, kit: Kit) -> None:
    refresh_manifest(artifact, signature=None)


def replayed_for_another_partition(artifact: Path, kit: Kit) -> None:
    sign(artifact, kit.key, partition="p3")  # the site's real signature, for p3's slot


def claims_another_site(artifact: Path, kit: Kit) -> None:
    sign(artifact, kit.key, site="site-c")


def signed_for_an_earlier_run_of_the_same_name(artifact: Path, kit: Kit) -> None:
    sign(artifact, kit.key, run_uid="u0")  # the site's real signature, an old run's uid


def tampered_after_upload(artifact: Path, kit: Kit) -> None:
    flip_byte(artifact / WEIGHTS)


def nan_weights(artifact: Path, kit: Kit) -> None:
    poison(artifact, kit.key)


@pytest.mark.parametrize(("damage", "check", "words"), [
    (tampered_after_upload, "sha256", WEIGHTS),
    (nan_weights, "non-finite", "q_proj"),
    (other_key_signs, "signature", "does not match"),
    (unsigned, "signature", "not signed"),
    (replayed_for_another_partition, "signature", "partition 'p3'"),
    (claims_another_site, "site", "site-c"),
    (signed_for_an_earlier_run_of_the_same_name, "run", "'u0', not this run's 'u1'"),
])
def test_bad_contributions_are_refused_with_their_check(kit, store, tmp_path, damage, check,
                                                        words):
    damage(upload(store, kit.good), kit)
    verdict = judge(store, tmp_path, public_key_b64(kit.key))
    assert (verdict.accepted, verdict.check) == (False, check), verdict
    assert words in verdict.detail
    assert verdict.manifest_sha256 == sha256_file(store / PREFIX / MANIFEST_NAME)


def test_artifact_from_another_base_is_refused(kit, store, tmp_path):
    upload(store, kit.foreign)
    verdict = judge(store, tmp_path, public_key_b64(kit.key))
    assert (verdict.accepted, verdict.check) == (False, "base-fingerprint")


def test_without_site_or_key_only_the_content_is_judged(kit, store, tmp_path):
    refresh_manifest(upload(store, kit.good), signature=None, site=None)
    assert judge(store, tmp_path, None, site=None).accepted


def test_ota_needs_the_second_moments(kit, store, tmp_path):
    artifact = upload(store, kit.good)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    (artifact / manifest["second_moments"]["file"]).unlink()
    sign(artifact, kit.key, second_moments=None)
    key = public_key_b64(kit.key)
    assert judge(store, tmp_path, key).accepted  # token weighting needs none
    verdict = judge(store, tmp_path, key, merge=MergeSpec(method="ota"))
    assert (verdict.accepted, verdict.check) == (False, "second-moments")


def test_undecidable_exits_permanent_without_a_verdict(kit, store, tmp_path, capsys):
    upload(store, kit.good)
    params = verify_params(store.as_uri(), (store / "models" / "gone").as_uri(),
                           public_key=public_key_b64(kit.key))
    assert run_main(params, tmp_path) == ExitCode.PERMANENT  # a missing base: no retry helps
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("MERITRUN_ERROR: ")
    assert not (store / OUTPUT).exists()


def test_s3_verdicts_accept_and_refuse(kit, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    storage = s3_bucket.open()
    storage.upload_dir(kit.base, "models/base")
    storage.upload_dir(kit.good, PREFIX)
    params = verify_params(s3_bucket.root_uri, f"{s3_bucket.root_uri}/models/base",
                           public_key=public_key_b64(kit.key), endpoint=s3_bucket.endpoint)

    def verdict(name: str) -> Verdict:
        assert run_main(params, tmp_path / name) == 0
        return Verdict.model_validate_json(storage.get_bytes(f"{OUTPUT}/{VERDICT_NAME}"))

    good = verdict("good")
    assert good.accepted
    assert good.manifest_sha256 == sha256_file(kit.good / MANIFEST_NAME)
    bad = tmp_path / "bad.safetensors"
    shutil.copyfile(kit.good / WEIGHTS, bad)
    flip_byte(bad)
    storage.put_file(f"{PREFIX}/{WEIGHTS}", bad)  # one byte changed after the upload
    tampered = verdict("tampered")
    assert (tampered.accepted, tampered.check) == (False, "sha256")
    assert WEIGHTS in tampered.detail
    storage.delete_prefix(PREFIX)
    storage.upload_dir(kit.foreign, PREFIX)
    assert verdict("foreign").check == "base-fingerprint"


def test_a_signed_manifest_naming_a_hub_directory_is_refused(kit, store, tmp_path):
    """The attack of issue 16: only a signed manifest, its model_dir another directory."""
    elsewhere = Path(shutil.copytree(kit.good, store / partition_prefix(RUN, "p0", ATTEMPT)))
    artifact = store / PREFIX
    artifact.mkdir(parents=True)
    shutil.copyfile(kit.good / MANIFEST_NAME, artifact / MANIFEST_NAME)
    for model_dir in (str(elsewhere / "model"), "../../p0/model"):
        data = json.loads((artifact / MANIFEST_NAME).read_text()) | {"model_dir": model_dir}
        (artifact / MANIFEST_NAME).write_text(json.dumps(data))
        verdict = judge(store, tmp_path / model_dir.replace("/", "_"), None, site=None)
        assert (verdict.accepted, verdict.check) == (False, "format"), verdict


def test_the_plan_bounds_the_claimed_tokens_and_the_verdict_records_it(kit, store, tmp_path):
    from meritrun.artifacts import TokenCounts

    artifact = upload(store, kit.good)
    sign(artifact, kit.key, tokens=TokenCounts(supervised=10**12, total=10**12))
    manifest = read_manifest(artifact)
    params = verify_params(store.as_uri(), (store / "models" / "base").as_uri(),
                           public_key=public_key_b64(kit.key))
    plan = {"sources": manifest.sources, "source_tokens": 500, "epochs": 2.0}
    params = params.model_copy(update={
        "partition": params.partition.model_copy(update=plan)})
    assert run_main(params, tmp_path) == 0
    verdict = Verdict.model_validate_json((store / OUTPUT / VERDICT_NAME).read_text())
    assert (verdict.accepted, verdict.check, verdict.token_bound) == (False, "tokens", 1000)
    sign(artifact, kit.key, tokens=TokenCounts(supervised=1000, total=2000))
    assert run_main(params, tmp_path / "honest") == 0
    verdict = Verdict.model_validate_json((store / OUTPUT / VERDICT_NAME).read_text())
    assert verdict.accepted and verdict.token_bound == 1000
    params = params.model_copy(update={"partition": params.partition.model_copy(
        update={"sources": ["somebody-else"]})})
    assert run_main(params, tmp_path / "sources") == 0
    verdict = Verdict.model_validate_json((store / OUTPUT / VERDICT_NAME).read_text())
    assert (verdict.accepted, verdict.check) == (False, "plan")


def test_a_lying_header_is_a_verdict_not_a_crash(kit, store, tmp_path):
    import struct

    artifact = upload(store, kit.good)
    path = artifact / WEIGHTS
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**15]
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    sign(artifact, kit.key)
    verdict = judge(store, tmp_path, public_key_b64(kit.key))
    assert (verdict.accepted, verdict.check) == (False, "safetensors-header")
    assert WEIGHTS in verdict.detail
