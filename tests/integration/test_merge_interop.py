"""mergekit both ways, plain Hugging Face directories, the model card and "did it help?"
(issue 12, points 3 and 7), through `meritrun merge`, `meritrun compare` and `meritrun eval`
on tiny real models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from support.experts import load_state, make_experts

from merit_merger.cli_eval import compare_main, default_name
from merit_merger.cli_eval import main as eval_main
from merit_merger.cli_merge import main as merge_main

MERGEKIT_PYTHON = Path(os.environ.get("MERITRUN_MERGEKIT_PYTHON",
                                      "/work/.venv-mergekit/bin/python"))


@pytest.fixture(scope="module")
def experts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_experts(tmp_path_factory.mktemp("interop"), tiny_base, 2, scale=0.02)


def plain_dirs(experts, root: Path) -> list[Path]:
    """The experts' model/ dirs copied out of their artifacts: no manifest.json."""
    out = []
    for a in experts.artifacts:
        shutil.copytree(a / "model", root / f"hf-{a.name}")
        out.append(root / f"hf-{a.name}")
    return out


def assert_same_weights(a: Path, b: Path, **tol) -> None:
    sa, sb = load_state(a), load_state(b)
    assert set(sa) == set(sb)
    for name in sa:
        torch.testing.assert_close(sa[name].float(), sb[name].float(), **tol)


def test_plain_hf_directories_merge_with_tensor_checks_only(experts, tiny_base, tmp_path,
                                                            capsys):
    dirs = plain_dirs(experts, tmp_path)
    out = tmp_path / "out"
    args = ["--base", str(tiny_base), "--out", str(out), *map(str, dirs)]
    assert merge_main(["--method", "token-weighted", *args]) == 2
    assert "carry no token counts" in capsys.readouterr().err
    assert merge_main(["--method", "ota", *args]) == 3  # needs second moments: both refused
    assert "second-moments" in capsys.readouterr().out
    assert merge_main(["--method", "ties", "--density", "0.5", *args]) == 0
    printed = capsys.readouterr().out
    assert "only tensor names, shapes, dtypes and finiteness" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert [p["verified"] for p in report["partitions"]] == ["tensors-only", "tensors-only"]
    assert report["included"] == ["hf-p0", "hf-p1"]
    card = (out / "model" / "README.md").read_text()
    assert "no manifest: tensors checked only" in card and "`ties`" in card


def test_a_non_finite_plain_directory_is_refused(experts, tiny_base, tmp_path, capsys):
    from support.experts import save_state

    dirs = plain_dirs(experts, tmp_path)
    state = load_state(dirs[1])
    name = next(iter(state))
    state[name][0] = float("nan")
    save_state(dirs[1], state)
    code = merge_main(["--method", "uniform", "--base", str(tiny_base), "--out",
                       str(tmp_path / "out"), *map(str, dirs)])
    assert code == 3 and "non-finite" in capsys.readouterr().out


@pytest.mark.parametrize("method", [["--method", "token-weighted"],
                                    ["--method", "ties", "--density", "0.4", "--scale", "0.9"]])
def test_exported_recipe_runs_back_through_meritrun_merge(method, experts, tiny_base, tmp_path,
                                                          capsys):
    first = tmp_path / "first"
    assert merge_main([*method, "--base", str(tiny_base), "--out", str(first),
                       *map(str, experts.artifacts)]) == 0
    recipe = yaml.safe_load((first / "mergekit.yaml").read_text())
    assert all(Path(m["model"]).is_absolute() and Path(m["model"]).is_dir()
               for m in recipe["models"])
    second = tmp_path / "second"
    assert merge_main(["--recipe", str(first / "mergekit.yaml"), "--base", str(tiny_base),
                       "--out", str(second)]) == 0
    again = json.loads((second / "merge_report.json").read_text())
    assert again["method"] == json.loads((first / "merge_report.json").read_text())["method"]
    # the recipe names the artifacts' model dirs: their manifests are found and checked
    assert [p["verified"] for p in again["partitions"]] == ["artifact", "artifact"]
    assert_same_weights(first / "model", second / "model", rtol=1e-6, atol=1e-7)
    capsys.readouterr()


def test_recipe_and_explicit_inputs_do_not_mix(experts, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(experts.artifacts[0] / "model")}]}))
    assert merge_main(["--recipe", str(recipe), "--method", "ties", "--out",
                       str(tmp_path / "o")]) == 2
    assert "give no PARTITION, --method" in capsys.readouterr().err
    assert merge_main(["--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "names no base_model: give --base" in capsys.readouterr().err


def test_held_out_scores_reach_the_report_the_card_and_compare(experts, tiny_base,
                                                               tiny_mixture, tmp_path, capsys):
    out = tmp_path / "out"
    assert merge_main(["--base", str(tiny_base), "--out", str(out), "--held-out",
                       str(tiny_mixture.held_out), *map(str, experts.artifacts)]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert list(evaluation["models"]) == ["base", "p0", "p1", "merged"]
    assert evaluation["sources"] == tiny_mixture.sources
    for scores in evaluation["models"].values():
        assert scores["macro"]["mean_loss"] > 0 and scores["macro"]["accuracy"] is not None
    assert "held-out loss (acc)" in printed and "merged" in printed
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "## Held-out scores" in card and "| p0 | src-p0 | 1000 | 0.3333 | included |" in card
    # compare: any models, by file:// URI (what `meritrun run` prints) or artifact dir
    merged_uri = (out / "model").as_uri()
    assert compare_main([str(tiny_base), merged_uri, f"first={experts.artifacts[0]}",
                         "--data", str(tiny_mixture.held_out), "--json",
                         str(tmp_path / "c.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-3:] == ["base", "out", "first"]
    doc = json.loads((tmp_path / "c.json").read_text())
    # the same model scored by the merge report and by compare gives the same numbers
    assert doc["models"]["out"]["macro"]["mean_loss"] == pytest.approx(
        evaluation["models"]["merged"]["macro"]["mean_loss"], rel=1e-5)
    # eval with several models is compare; with one model it keeps its detailed table
    assert eval_main([merged_uri, str(tiny_base), "--data", str(tiny_mixture.held_out),
                      "--no-generate"]) == 0
    assert "held-out loss (acc)" in capsys.readouterr().out


def test_default_names_skip_generic_path_parts():
    assert default_name("file:///w/store/runs/demo/merged/attempt-1/model") == "merged"
    assert default_name("s3://b/runs/demo/partitions/p0/attempt-2") == "p0"
    assert default_name("/tmp/base") == "base"


@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(),
                    reason="mergekit is not a MeritRun dependency; set MERITRUN_MERGEKIT_PYTHON "
                           "to a python with mergekit installed to run it")
def test_mergekit_itself_runs_the_exported_recipe(experts, tiny_base, tmp_path, capsys):
    ours = tmp_path / "ours"
    assert merge_main(["--method", "ties", "--density", "0.4", "--base", str(tiny_base),
                       "--out", str(ours), *map(str, experts.artifacts)]) == 0
    capsys.readouterr()
    theirs = tmp_path / "theirs"
    mergekit_yaml = MERGEKIT_PYTHON.parent / "mergekit-yaml"
    done = subprocess.run([str(mergekit_yaml), str(ours / "mergekit.yaml"), str(theirs),
                           "--allow-crimes", "--no-lazy-unpickle"], capture_output=True,
                          text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(ours / "model", theirs, rtol=1e-4, atol=1e-6)


def test_compare_takes_s3_uris_of_models_and_data(experts, tiny_base, tiny_mixture, s3_bucket,
                                                  tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    storage = s3_bucket.open()
    storage.upload_dir(tiny_base, "models/base")
    storage.upload_dir(experts.artifacts[0], "runs/r/u/partitions/p0/attempt-1")
    storage.put_file("data/held.jsonl", tiny_mixture.held_out)
    root = s3_bucket.root_uri
    assert compare_main([f"{root}/models/base", f"{root}/runs/r/u/partitions/p0/attempt-1",
                         "--data", f"{root}/data/held.jsonl", "--endpoint", s3_bucket.endpoint,
                         "--no-generate", "--json", str(tmp_path / "c.json")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[-2:] == ["base", "p0"]
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["models"]["p0"]["macro"]["accuracy"] is None  # --no-generate: loss only
    assert doc["models"]["base"]["macro"]["mean_loss"] > 0
