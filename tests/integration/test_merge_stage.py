"""The merge stage and the merge CLI end to end: file:// storage as a subprocess, S3 (real
SeaweedFS) with a corrupted upload, quorum failures and exit codes, report and recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.experts import load_state, make_experts, refresh_manifest, upload_to_bucket

from merit_merger import stage
from merit_merger.cli_merge import main as cli_main
from meritrun.api import MergeSpec, OtaSpec
from meritrun.errors import ExitCode
from meritrun.stages import MergeParams, PartitionInput, StorageParams

RUN, OUTPUT = "r1", "runs/r1/merged/attempt-1"


def prefix(name: str) -> str:
    return f"runs/{RUN}/partitions/{name}/attempt-1"


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_experts(tmp_path_factory.mktemp("stage-experts"), tiny_base, 3)


@pytest.fixture
def store(pristine, tiny_base: Path, tmp_path: Path) -> Path:
    """A file:// storage root holding the base and three partition artifacts."""
    root = tmp_path / "store"
    shutil.copytree(tiny_base, root / "models" / "base")
    for a in pristine.artifacts:
        shutil.copytree(a, root / prefix(a.name))
    return root


def params(root_uri: str, base_uri: str, merge: MergeSpec, **storage) -> MergeParams:
    return MergeParams(
        run=RUN, run_uid="u1", attempt=1, storage=StorageParams(uri=root_uri, **storage),
        base_model=base_uri,
        output=OUTPUT, partitions=[PartitionInput(name=p, prefix=prefix(p))
                                   for p in ("p0", "p1", "p2")], merge=merge)


def write_params(tmp_path: Path, p: MergeParams) -> Path:
    path = tmp_path / "params.json"
    path.write_text(p.model_dump_json())
    return path


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_stage_subprocess_merges_on_a_file_root(store, tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    p = params(store.as_uri(), (store / "models" / "base").as_uri(),
               MergeSpec(method="ota", ota=OtaSpec(density=0.3)))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "merit_merger.stage", "merge", "--params",
         str(write_params(tmp_path, p)), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = store / OUTPUT
    report = json.loads((out / "merge_report.json").read_text())
    assert report["status"] == "succeeded" and report["included"] == ["p0", "p1", "p2"]
    assert report["method"] == "ota" and report["parameters"]["density"] == 0.3
    assert all(p["ffg_threshold"] > 0 for p in report["partitions"])
    # OTA: no mergekit equivalent; the file holds the nearest recipe under that warning
    assert report["mergekit"]["exact"] is False and "no equivalent" in report["mergekit"]["note"]
    assert "NOT A REPRODUCTION" in (out / "mergekit.yaml").read_text()
    assert (out / "merge_layers.png").stat().st_size > 1000
    assert set(load_state(out / "model")) == set(load_state(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())


def test_quorum_not_met_exits_3_and_still_reports(store, tmp_path, capsys):
    corrupt(store / prefix("p1") / "model" / "model.safetensors")
    p = params(store.as_uri(), (store / "models" / "base").as_uri(), MergeSpec(quorum=1.0))
    code = stage.main(["merge", "--params", str(write_params(tmp_path, p))])
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("MERITRUN_ERROR: quorum")
    report = json.loads((store / OUTPUT / "merge_report.json").read_text())
    assert report["status"] == "failed"
    assert report["refused"] == [{"partition": "p1", "check": "sha256", "detail": report[
        "refused"][0]["detail"]}]
    assert not (store / OUTPUT / "model").exists()


def test_quorum_met_merges_the_rest_with_renormalized_weights(store, tmp_path):
    corrupt(store / prefix("p1") / "model" / "model.safetensors")
    p = params(store.as_uri(), (store / "models" / "base").as_uri(), MergeSpec(quorum=0.6))
    report = stage.run_merge_stage(p, workdir=tmp_path / "work")
    weights = {x["name"]: x["weight"] for x in report["partitions"]}
    assert weights == {"p0": pytest.approx(0.25), "p1": None, "p2": pytest.approx(0.75)}
    assert [x["status"] for x in report["partitions"]] == ["included", "refused", "included"]
    recipe = yaml.safe_load((store / OUTPUT / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == pytest.approx([0.25, 0.75])
    assert recipe["models"][0]["model"].endswith(f"{prefix('p0')}/model")


def test_bad_params_exit_permanent(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"run": "x"}')
    assert stage.main(["merge", "--params", str(tmp_path / "bad.json")]) == ExitCode.PERMANENT
    assert "MERITRUN_ERROR: params" in capsys.readouterr().err


def test_s3_corrupted_upload_is_a_sha256_refusal(pristine, tiny_base, s3_bucket, tmp_path,
                                                 monkeypatch):
    storage = upload_to_bucket(s3_bucket, tiny_base, pristine.artifacts, prefix, monkeypatch)
    bad = tmp_path / "bad.safetensors"
    shutil.copyfile(pristine.artifacts[2] / "model" / "model.safetensors", bad)
    corrupt(bad)
    storage.put_file(f"{prefix('p2')}/model/model.safetensors", bad)
    p = params(s3_bucket.root_uri, f"{s3_bucket.root_uri}/models/base",
               MergeSpec(method="ties", density=0.5, scale=0.8, quorum=0.5),
               endpoint=s3_bucket.endpoint)
    report = stage.run_merge_stage(p, workdir=tmp_path / "work")
    assert [(r["partition"], r["check"]) for r in report["refused"]] == [("p2", "sha256")]
    assert report["included"] == ["p0", "p1"]
    keys = storage.list_keys(OUTPUT)
    assert f"{OUTPUT}/merge_report.json" in keys and f"{OUTPUT}/model/config.json" in keys
    recipe = yaml.safe_load(storage.get_bytes(f"{OUTPUT}/mergekit.yaml"))
    assert recipe["merge_method"] == "ties" and recipe["parameters"]["lambda"] == 0.8
    assert recipe["models"][0]["parameters"] == {"weight": 1.0, "density": 0.5}
    assert recipe["base_model"] == "models/base"  # an S3 key: the header says what to download
    assert f"aws s3 cp --recursive {s3_bucket.root_uri}/models/base models/base" in (
        storage.get_bytes(f"{OUTPUT}/mergekit.yaml").decode())


def test_cli_prints_the_table_and_refuses_foreign_flags(pristine, tiny_base, tmp_path, capsys):
    args = ["--base", str(tiny_base), "--out", str(tmp_path / "out"),
            *map(str, pristine.artifacts)]
    assert cli_main(["--method", "tokenWeighted", "--density", "0.3", *args]) == 2
    assert "takes no parameter" in capsys.readouterr().err
    assert cli_main(["--method", "dare", "--density", "0.5", "--shard-size-mb", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "p0" in out and "included" in out and str(tmp_path / "out" / "model") in out
    recipe = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "dare_linear"
    assert recipe["models"][2]["model"] == str(pristine.artifacts[2] / "model")


def test_settings_from_the_spec():
    from merit_merger.job import settings_from_spec

    ota = settings_from_spec(MergeSpec(method="ota", ota=OtaSpec(density=0.3, power=1.0),
                                       shard_size_mb=5))
    assert ota.method == "ota" and ota.shard_size_bytes == 5_000_000
    assert ota.params == {"power": 1.0, "epsilon": 1e-26, "density": 0.3}
    ties = settings_from_spec(MergeSpec(method="ties", scale=0.5, ota=OtaSpec(density=0.3)))
    assert ties.params == {"density": 0.2, "scale": 0.5}  # ota.density is OTA's alone
    assert settings_from_spec(MergeSpec(method="tokenWeighted")).params == {}


def test_bad_signature_is_refused_while_the_others_merge(store, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meritrun.artifacts import read_manifest, write_manifest
    from meritrun.signing import public_key_b64, sign_manifest

    site_key = Ed25519PrivateKey.generate()
    for name, key in (("p1", Ed25519PrivateKey.generate()), ("p2", site_key)):
        artifact = store / prefix(name)
        refresh_manifest(artifact, run=RUN, site="b")
        write_manifest(artifact, sign_manifest(read_manifest(artifact), key))
    site_b = {"site": "b", "public_key": public_key_b64(site_key)}
    p = params(store.as_uri(), (store / "models" / "base").as_uri(), MergeSpec(quorum=0.6))
    p = p.model_copy(update={"partitions": [
        PartitionInput(name="p0", prefix=prefix("p0")),  # hub-trained: no site, no key
        PartitionInput(name="p1", prefix=prefix("p1"), **site_b),
        PartitionInput(name="p2", prefix=prefix("p2"), **site_b)]})
    report = stage.run_merge_stage(p, workdir=tmp_path / "work")
    assert [(r["partition"], r["check"]) for r in report["refused"]] == [("p1", "signature")]
    assert "does not match" in report["refused"][0]["detail"]
    assert report["status"] == "succeeded" and report["included"] == ["p0", "p2"]
    assert (store / OUTPUT / "model" / "config.json").is_file()


@pytest.mark.parametrize("flags, name", [(["--method", "ota", "--power", "nan"], "power"),
                                         (["--method", "ota", "--epsilon", "inf"], "epsilon"),
                                         (["--method", "ties", "--scale=-inf"], "scale"),
                                         (["--quorum", "nan"], "--quorum")])
def test_cli_refuses_non_finite_parameters_up_front(pristine, tiny_base, tmp_path, capsys,
                                                    flags, name):
    out = tmp_path / "out"
    code = cli_main([*flags, "--base", str(tiny_base), "--out", str(out),
                     *map(str, pristine.artifacts)])
    err = capsys.readouterr().err
    assert code == 2 and name in err and ("finite" in err or "(0, 1]" in err), err
    assert not out.exists()  # refused before anything was read or written


def test_cli_merge_output_that_overflows_is_not_published(pristine, tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["--method", "task-arithmetic", "--scale", "1e300", "--base", str(tiny_base),
                     "--out", str(out), *map(str, pristine.artifacts)])
    assert code == 2 and "NaN/Inf" in capsys.readouterr().err
    assert not list((out / "model").glob("*.safetensors"))


def test_cli_merges_the_others_past_a_lying_header_and_huge_values(pristine, tiny_base,
                                                                    tmp_path, capsys):
    import struct

    parts = [Path(shutil.copytree(a, tmp_path / a.name)) for a in pristine.artifacts]
    weights = parts[0] / "model" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 5) + b"[1,2]" + raw[8:])  # a list, not a map
    refresh_manifest(parts[0])
    state = load_state(parts[1] / "model")
    state["model.norm.weight"][0] = 3e38
    from support.experts import save_state

    save_state(parts[1] / "model", state)
    refresh_manifest(parts[1])
    code = cli_main(["--quorum", "0.3", "--base", str(tiny_base), "--out", str(tmp_path / "o"),
                     *map(str, parts)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    assert report["included"] == ["p2"]
    checks = {r["partition"]: (r["check"], r["detail"]) for r in report["refused"]}
    assert checks["p0"][0] == "safetensors-header" and "model/model.safetensors" in checks["p0"][1]
    assert checks["p1"][0] == "magnitude"
    merged = load_state(tmp_path / "o" / "model")
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_stage_report_records_the_token_bound(store, tmp_path):
    p = params(store.as_uri(), (store / "models" / "base").as_uri(), MergeSpec(quorum=0.6))
    plan = {"p0": 1000, "p1": 100, "p2": 3000}  # p1 claims 2000 tokens of 100 x 2 epochs
    p = p.model_copy(update={"partitions": [
        part.model_copy(update={"sources": [f"src-{part.name}"], "attempt": 1,
                                "source_tokens": plan[part.name], "epochs": 2.0})
        for part in p.partitions]})
    report = stage.run_merge_stage(p, workdir=tmp_path / "work")
    assert [(r["partition"], r["check"]) for r in report["refused"]] == [("p1", "tokens")]
    assert {e["name"]: e["token_bound"] for e in report["partitions"]} == {
        "p0": 2000, "p1": 200, "p2": 6000}
