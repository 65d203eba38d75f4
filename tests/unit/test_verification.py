"""Every refusal reason of the contribution checks, each naming the check and the partition."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.experts import (
    load_state,
    make_experts,
    make_lora_adapter,
    refresh_manifest,
    save_state,
    verify_artifacts,
    write_partition,
)

from merit_merger.checks import CHECKS
from merit_merger.verification import QuorumNotMet, require_quorum
from meritrun.artifacts import MANIFEST_NAME, TokenCounts
from meritrun.errors import ContributionRejected


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_experts(tmp_path_factory.mktemp("pristine"), tiny_base, 3)


@pytest.fixture
def parts(pristine, tmp_path: Path) -> list[Path]:
    return [Path(shutil.copytree(a, tmp_path / a.name)) for a in pristine.artifacts]


def only_refusal(refused, partition: str, check: str) -> ContributionRejected:
    assert check in CHECKS
    assert [(r.partition, r.check) for r in refused] == [(partition, check)], refused
    return refused[0]


def edit_tensor(artifact: Path, fn) -> None:
    model = artifact / "model"
    state = load_state(model)
    fn(state)
    save_state(model, state)
    refresh_manifest(artifact)


def test_clean_partitions_pass_with_update_norms(parts, tiny_base):
    refused, result = verify_artifacts(parts, tiny_base)
    assert refused == [] and [s.name for s in result.accepted] == ["p0", "p1", "p2"]
    assert all(n > 0 for n in result.update_norms.values())
    assert set(result.tensor_norms) == set(load_state(tiny_base))


def test_corrupted_file_is_refused_by_sha256(parts, tiny_base):
    path = parts[1] / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    r = only_refusal(verify_artifacts(parts, tiny_base)[0], "p1", "sha256")
    assert "model/model.safetensors" in r.detail


def test_unlisted_file_is_refused(parts, tiny_base):
    (parts[0] / "model" / "extra.safetensors").write_bytes(b"x")
    only_refusal(verify_artifacts(parts, tiny_base)[0], "p0", "sha256")


def test_missing_files_are_refused(parts, tiny_base):
    (parts[2] / "model" / "config.json").unlink()
    (parts[0] / MANIFEST_NAME).unlink()
    refused = verify_artifacts(parts, tiny_base)[0]
    assert sorted((r.partition, r.check) for r in refused) == [("p0", "missing-file"),
                                                               ("p2", "missing-file")]


def test_unknown_format_and_garbage_manifest_are_refused(parts, tiny_base):
    refresh_manifest(parts[0], format="meritrun.partition/v9")
    (parts[1] / MANIFEST_NAME).write_text("{not json")
    refused = verify_artifacts(parts, tiny_base)[0]
    assert sorted((r.partition, r.check) for r in refused) == [("p0", "format"),
                                                               ("p1", "format")]


def test_wrong_base_is_refused(parts, tiny_base):
    refresh_manifest(parts[2], base="sha256:" + "0" * 64)
    only_refusal(verify_artifacts(parts, tiny_base)[0], "p2", "base-fingerprint")


def test_zero_tokens_are_refused(parts, tiny_base):
    refresh_manifest(parts[0], tokens=TokenCounts(supervised=0, total=5))
    only_refusal(verify_artifacts(parts, tiny_base)[0], "p0", "tokens")


def test_wrong_tensor_name_shape_and_dtype_are_refused(parts, tiny_base):
    edit_tensor(parts[0], lambda s: s.__setitem__("model.extra", s.pop("model.norm.weight")))
    edit_tensor(parts[1], lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    edit_tensor(parts[2], lambda s: s.__setitem__("model.norm.weight",
                                                  torch.ones(64, dtype=torch.int32)))
    refused = verify_artifacts(parts, tiny_base, refuse_outliers=False)[0]
    assert [(r.partition, r.check) for r in refused] == [
        ("p0", "tensor-name"), ("p1", "tensor-shape"), ("p2", "tensor-dtype")]
    assert "model.norm.weight" in refused[1].detail


def test_float_precision_differences_are_accepted_unless_strict(parts, tiny_base):
    edit_tensor(parts[0], lambda s: s.__setitem__("model.norm.weight",
                                                  s["model.norm.weight"].half()))
    assert verify_artifacts(parts, tiny_base)[0] == []
    only_refusal(verify_artifacts(parts, tiny_base, strict_dtype=True)[0], "p0", "tensor-dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(parts, tiny_base, bad):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][3, 4] = bad
    edit_tensor(parts[1], poison)
    r = only_refusal(verify_artifacts(parts, tiny_base)[0], "p1", "non-finite")
    assert "model.layers.1.mlp.up_proj.weight" in r.detail


def test_outlier_norm_is_flagged_or_refused(parts, tiny_base):
    base = load_state(tiny_base)

    def blow_up(state):
        for n, t in state.items():
            state[n] = base[n] + 20 * (t - base[n])
    edit_tensor(parts[2], blow_up)
    refused, result = verify_artifacts(parts, tiny_base, outlier_factor=5.0)
    assert refused == [] and [f.partition for f in result.outliers] == ["p2"]
    assert result.outliers[0].ratio == pytest.approx(20, rel=0.2)
    refused, _ = verify_artifacts(parts, tiny_base, refuse_outliers=True)
    r = only_refusal(refused, "p2", "outlier-norm")
    assert "median" in r.detail


def test_ota_needs_second_moments_and_refuses_lora(parts, tiny_base, tmp_path):
    adapter = make_lora_adapter(tmp_path / "adapter", tiny_base)
    lora = write_partition(tmp_path / "lora", "p3", base_dir=tiny_base, adapter_dir=adapter)
    manifest = json.loads((parts[0] / MANIFEST_NAME).read_text())
    (parts[0] / "optimizer_v.safetensors").unlink()
    manifest["files"].pop("optimizer_v.safetensors")
    manifest.pop("second_moments")
    (parts[0] / MANIFEST_NAME).write_text(json.dumps(manifest))
    refused, result = verify_artifacts([*parts, lora], tiny_base, method="ota")
    assert [(r.partition, r.check) for r in refused] == [("p0", "second-moments"),
                                                         ("p3", "second-moments")]
    assert "LoRA" in refused[1].detail
    assert [s.name for s in result.accepted] == ["p1", "p2"]
    refused, _ = verify_artifacts([*parts, lora], tiny_base, method="token-weighted")
    assert refused == []  # token weighting needs no moments, and merges LoRA as full weights


def test_malformed_rank1_factors_are_refused(parts, tiny_base):
    from safetensors.torch import load_file, save_file

    path = parts[1] / "optimizer_v.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight::row"] = torch.ones(7)
    save_file(tensors, str(path), metadata=meta)
    refresh_manifest(parts[1])
    r = only_refusal(verify_artifacts(parts, tiny_base, method="ota")[0], "p1", "second-moments")
    assert "up_proj" in r.detail


def test_quorum():
    refusal = ContributionRejected("p1", "sha256", "bad")
    require_quorum(3, 4, 0.75, [refusal])
    with pytest.raises(QuorumNotMet, match="3/4") as err:
        require_quorum(3, 4, 1.0, [refusal])
    assert err.value.refused == [refusal]
    with pytest.raises(QuorumNotMet):
        require_quorum(0, 2, 0.1, [])


def test_site_and_signature_are_checked_where_expected(parts, tiny_base):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meritrun.artifacts import read_manifest, write_manifest
    from meritrun.signing import public_key_b64, sign_manifest
    from meritrun.stages import PartitionInput

    key = Ed25519PrivateKey.generate()
    for p, site in zip(parts, ("a", "b", "b"), strict=True):
        refresh_manifest(p, site=site, run="r")
        write_manifest(p, sign_manifest(read_manifest(p), key))
    registered = public_key_b64(key)
    expected = {"p0": PartitionInput(name="p0", prefix="x"),  # hub partition: nothing to check
                "p1": PartitionInput(name="p1", prefix="x", site="c"),
                "p2": PartitionInput(name="p2", prefix="x", site="b", public_key=registered)}
    refused, result = verify_artifacts(parts, tiny_base, expected=expected, run="r")
    assert "site 'b'" in only_refusal(refused, "p1", "site").detail
    assert [s.name for s in result.accepted] == ["p0", "p2"]
    # The same valid signature does not vouch for another run (a replayed contribution).
    refused, _ = verify_artifacts(parts, tiny_base, expected={"p2": expected["p2"]}, run="r2")
    assert "run 'r' (expected 'r2')" in only_refusal(refused, "p2", "signature").detail
    # ...nor for another attempt of the same partition (the merge knows which it merges).
    later = expected["p2"].model_copy(update={"attempt": 2})
    refused, _ = verify_artifacts(parts, tiny_base, expected={"p2": later}, run="r")
    assert "attempt 1 (expected 2)" in only_refusal(refused, "p2", "signature").detail
    refresh_manifest(parts[2], signature=None)  # unsigned although the site has a key
    refused, _ = verify_artifacts(parts, tiny_base, expected={"p2": expected["p2"]}, run="r")
    assert "not signed" in only_refusal(refused, "p2", "signature").detail


def test_a_manifest_of_another_run_uid_is_refused(parts, tiny_base):
    """A re-created run of the same name must not merge what the earlier one trained."""
    from meritrun.stages import PartitionInput

    refresh_manifest(parts[0], run_uid="old-uid")
    refresh_manifest(parts[1], run_uid="new-uid")  # parts[2]: no run_uid at all (older trainer)
    expected = {p.name: PartitionInput(name=p.name, prefix="x", run_uid="new-uid")
                for p in parts}
    refused, result = verify_artifacts(parts, tiny_base, expected=expected, run="r")
    assert sorted((r.partition, r.check) for r in refused) == [("p0", "run"), ("p2", "run")]
    assert "'old-uid', not this run's 'new-uid'" in refused[0].detail
    assert [s.name for s in result.accepted] == ["p1"]


@pytest.mark.parametrize("garbage", [b"not a safetensors file at all",
                                     (10**9).to_bytes(8, "little") + b"{}"])
def test_a_weight_file_that_is_not_safetensors_is_refused_as_format(parts, tiny_base, garbage):
    (parts[1] / "model" / "model.safetensors").write_bytes(garbage)
    refresh_manifest(parts[1])  # the site hashed its broken file: sha256 cannot catch it
    r = only_refusal(verify_artifacts(parts, tiny_base)[0], "p1", "safetensors-header")
    assert "model.safetensors" in r.detail


def test_a_moments_file_that_is_not_safetensors_is_refused(parts, tiny_base):
    v = parts[0] / "optimizer_v.safetensors"
    assert v.is_file()
    v.write_bytes(b"\x00" * 3)
    refresh_manifest(parts[0])
    only_refusal(verify_artifacts(parts, tiny_base, "ota")[0], "p0", "safetensors-header")


@pytest.mark.parametrize("kind", ["rank1", "full"])
def test_the_numpy_scan_finds_what_the_torch_scan_finds(tiny_base, tmp_path, monkeypatch, kind):
    """Full weights are scanned by `valuescan` reading them itself (a fused merge imports no
    torch), LoRA on torch blocks (`NormScan`): the same refusals, each partition's first
    problem, and the same update norms bit for bit (the same blocks judged the same way)."""
    from safetensors.torch import load_file, save_file

    from merit_merger import valuescan
    from merit_merger.io import ModelReader
    from merit_merger.sources import PartitionSource
    from merit_merger.verification import scan_tensors

    artifacts = make_experts(tmp_path, tiny_base, 4, moments_kind=kind).artifacts
    names = list(load_state(tiny_base))
    edit_tensor(artifacts[1], lambda s: s[names[-1]].view(-1).__setitem__(-1, float("inf")))
    edit_tensor(artifacts[2], lambda s: s[names[1]].view(-1).__setitem__(0, 3e16))
    sources = [PartitionSource.from_artifact(a) for a in artifacts]
    if kind == "full":  # a negative second moment in p3
        v = load_file(sources[3].moments)
        v[names[0]].view(-1)[5] = -1.0
        save_file(v, sources[3].moments, metadata={"kind": "full"})

    def scan() -> tuple[dict, list]:
        norms, refused = scan_tensors(sources, ModelReader(tiny_base), moments=True,
                                      chunk_elements=100)
        return norms, [(r.partition, r.check, r.detail) for r in refused]

    norms, refused = scan()
    monkeypatch.setattr(valuescan, "scannable", lambda *a: False)
    torch_norms, torch_refused = scan()
    assert refused == torch_refused and len(refused) == (3 if kind == "full" else 2)
    assert {p for p, *_ in refused} == ({"p1", "p2", "p3"} if kind == "full" else {"p1", "p2"})
    assert norms.keys() == set(names) and norms == torch_norms
    assert all(norms[t].keys() == ({"p0"} if kind == "full" else {"p0", "p3"}) for t in names)
