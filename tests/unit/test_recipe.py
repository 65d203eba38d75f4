"""mergekit both ways (issue 12, point 7): the exported recipe names paths mergekit loads,
for every method mergekit has (OTA: the nearest recipe, marked as no reproduction), and a
mergekit recipe of our methods translates to the same method and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merit_merger.methods import get_method
from merit_merger.recipe import local_path, mergekit_recipe, recipe_plan, write_recipe
from meritrun.errors import SpecError

PARTS = [("p0", "file:///data/store/runs/r/partitions/p0/attempt-1/model", "full"),
         ("p1", "file:///data/store/runs/r/partitions/p1/attempt-1/model", "full")]
WEIGHTS = {"p0": 0.25, "p1": 0.75}
PARAMS = {"token-weighted": {}, "uniform": {}, "task-arithmetic": {"scale": 0.5},
          "ties": {"density": 0.3, "scale": 0.8}, "dare": {"density": 0.5, "scale": 0.7,
                                                           "seed": 0},
          "ota": {"power": 0.5, "epsilon": 1e-26, "density": 0.3}}


def export(method: str, tmp_path: Path, parts=PARTS, base="file:///data/base") -> tuple[dict, str]:
    m = get_method(method)
    recipe = mergekit_recipe(method=m, params=PARAMS[method], base=base, partitions=parts,
                             weights=WEIGHTS, dtype="float32")
    path = write_recipe(tmp_path / "mergekit.yaml", recipe, method=m,
                        locations=[base, *(u for _, u, _ in parts)])
    text = path.read_text()
    return yaml.safe_load(text), text


@pytest.mark.parametrize("method", ["token-weighted", "uniform", "task-arithmetic", "ties",
                                    "dare", "ota"])
def test_exported_recipe_names_absolute_local_paths(method, tmp_path):
    recipe, text = export(method, tmp_path)
    assert "file://" not in text
    assert [m["model"] for m in recipe["models"]] == [
        "/data/store/runs/r/partitions/p0/attempt-1/model",
        "/data/store/runs/r/partitions/p1/attempt-1/model"]
    if "base_model" in recipe:
        assert recipe["base_model"] == "/data/base"


@pytest.mark.parametrize("method", ["token-weighted", "uniform", "task-arithmetic", "ties",
                                    "dare"])
def test_export_then_import_gives_back_the_method_and_parameters(method, tmp_path):
    export(method, tmp_path)
    plan = recipe_plan(tmp_path / "mergekit.yaml")
    expected = {"token-weighted": "token-weighted", "uniform": "uniform"}.get(method, method)
    assert plan.method == expected
    assert plan.models == [u.removeprefix("file://") for _, u, _ in PARTS]
    wanted = {k: v for k, v in PARAMS[method].items() if k != "seed"}
    assert plan.params == pytest.approx(wanted)
    if method == "token-weighted":
        assert plan.weights == [0.25, 0.75]


def test_ota_is_exported_as_the_nearest_recipe_under_a_warning(tmp_path):
    recipe, text = export("ota", tmp_path)
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("NOT A REPRODUCTION" in line and "no equivalent of OTA" in line
               for line in header)
    assert recipe["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.25, 0.75]


def test_s3_locations_become_relative_paths_with_download_commands(tmp_path):
    parts = [("p0", "s3://bucket/runs/r/partitions/p0/attempt-1/model", "full")]
    recipe, text = export("ties", tmp_path, parts=parts, base="s3://bucket/models/base")
    assert recipe["models"][0]["model"] == "runs/r/partitions/p0/attempt-1/model"
    assert recipe["base_model"] == "models/base"
    assert ("#   aws s3 cp --recursive s3://bucket/models/base models/base" in text)
    assert local_path("/abs/dir") == ("/abs/dir", None)


def test_lora_partitions_use_mergekits_plus_syntax(tmp_path):
    parts = [("p0", "file:///s/p0/model", "lora"), ("p1", "file:///s/p1/model", "lora")]
    recipe, _ = export("task-arithmetic", tmp_path, parts=parts)
    assert recipe["models"][0]["model"] == "/data/base+/s/p0/model"
    plan = recipe_plan(tmp_path / "mergekit.yaml")
    assert plan.base == "/data/base" and plan.models == ["/s/p0/model", "/s/p1/model"]


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("doc", "message"), [
    ({"merge_method": "dare_ties", "base_model": "/b", "models": [{"model": "/m"}]},
     "not one MeritRun runs"),
    ({"merge_method": "slerp", "base_model": "/b",
      "slices": [{"sources": [{"model": "/m", "layer_range": [0, 2]}]}]}, "slices"),
    ({"merge_method": "ties", "base_model": "/b",
      "models": [{"model": "/m", "parameters": {"weight": 1, "density": 0.2}},
                 {"model": "/n", "parameters": {"weight": 2, "density": 0.2}}]},
     "weight differs"),
    ({"merge_method": "task_arithmetic", "models": [{"model": "/m"}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "/b",
      "models": [{"model": "/m", "parameters": {"density": [0.1, 0.5]}}]}, "gradients"),
])
def test_recipes_we_cannot_run_are_refused_with_the_reason(doc, message, tmp_path):
    with pytest.raises(SpecError, match=message):
        recipe_plan(write(tmp_path, doc))


def test_mergekit_defaults_translate_to_our_formulas(tmp_path):
    # task_arithmetic with weight 0.5 each and lambda 2: theta0 + 2 * 0.5 * sum tau
    plan = recipe_plan(write(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": "/b", "parameters": {"lambda": 2.0},
        "models": [{"model": "/m", "parameters": {"weight": 0.5}},
                   {"model": "/n", "parameters": {"weight": 0.5}}]}))
    assert (plan.method, plan.params) == ("task-arithmetic", {"scale": 1.0})
    plan = recipe_plan(write(tmp_path, {
        "merge_method": "linear", "models": [{"model": "/m"}, {"model": "/n"}]}))
    assert (plan.method, plan.weights, plan.base) == ("uniform", None, None)
