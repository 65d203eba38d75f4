"""The CRD is generated from the models: the committed file must match, and the schema must be
structural (what the API server demands before it serves a CRD)."""

from __future__ import annotations

from pathlib import Path

import yaml

from meritrun.crd import build_crd, render_crd_yaml

ROOT = Path(__file__).resolve().parents[2]


def _walk(node, path="schema"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_matches_models():
    assert (ROOT / "crds" / "meritrun.yaml").read_text() == render_crd_yaml(), (
        "crds/meritrun.yaml is stale: run `meritrun crd > crds/meritrun.yaml`")


def test_chart_crd_is_the_same_file():
    chart_crd = ROOT / "charts" / "meritrun" / "files" / "meritrun-crd.yaml"
    assert chart_crd.read_text() == (ROOT / "crds" / "meritrun.yaml").read_text(), (
        "copy crds/meritrun.yaml to charts/meritrun/files/meritrun-crd.yaml")
    # Helm never upgrades crds/: the chart ships its CRD as a template (templates/crd.yaml).
    assert not (ROOT / "charts" / "meritrun" / "crds").exists(), (
        "the chart's CRD lives in files/meritrun-crd.yaml (a template), not in crds/")


def test_schema_is_structural_and_documented():
    version = build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node, path
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), path
        if path.startswith("schema.spec.") and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


def test_validation_rules_and_subresources_present():
    version = build_crd()["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["baseModel", "data"]
    assert props["partitioning"]["properties"]["strategy"]["enum"] == [
        "conflictPCA", "random", "manual", "bySite"]
    lr = props["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert props["backoffLimit"]["minimum"] == 0
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Partitions"] == ".status.progress"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert build_crd()["spec"]["names"]["shortNames"] == ["mr"]


def test_crd_yaml_round_trips():
    assert yaml.safe_load(render_crd_yaml()) == build_crd()
