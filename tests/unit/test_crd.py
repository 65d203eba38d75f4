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


def test_crd_is_a_valid_customresourcedefinition():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(build_crd(), version, strict=True)


def _spec_schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_named_lists_are_list_maps_with_bounded_sizes():
    spec = _spec_schema()["properties"]
    for node in (spec["sites"], spec["data"]["properties"]["sources"]):
        assert node["x-kubernetes-list-type"] == "map"
        assert node["x-kubernetes-list-map-keys"] == ["name"]
        assert node["maxItems"] and node["items"]["properties"]["name"]["maxLength"]
        assert "name" in node["items"]["required"]


def test_spec_sections_have_defaults_the_status_none():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]["properties"]
    for section in ("profiling", "partitioning", "training", "template", "merge",
                    "mixtureSearch"):
        assert spec[section]["default"] == {}, section
    assert spec["training"]["properties"]["learningRate"]["default"] == 3e-4
    assert spec["partitioning"]["properties"]["strategy"]["default"] == "conflictPCA"
    assert not any("default" in node for _, node in _walk(schema["properties"]["status"]))


def test_cel_rules_cover_the_models_cross_field_rules_and_immutability():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [r for _, node in _walk(schema) for r in node.get("x-kubernetes-validations", [])]
    messages = " | ".join(r["message"] for r in rules)
    for words in ("metadata.name: at most 40", "strategy manual needs", "set either data.uri",
                  "must name an entry of spec.sites", "sketches: no source",
                  "only pull sites upload sketches", "ota needs full fine-tuning",
                  "needs data.heldOutUri"):
        assert words in messages, words
    for field in ("baseModel", "data", "storage", "profiling", "partitioning", "training",
                  "template", "sites", "merge", "mixtureSearch"):
        assert f"spec.{field} cannot change" in messages, field
    assert all("oldSelf" in r["rule"] for r in rules if "cannot change" in r["message"])


def test_int64_bounds_are_a_format_not_a_float_maximum():
    # kube-apiserver refuses a CRD whose integer maximum is 2^63-1: as a float64 it rounds past
    # int64 ('Maximum boundary value must be of type integer')
    seed = _spec_schema()["properties"]["training"]["properties"]["seed"]
    assert seed["format"] == "int64" and "maximum" not in seed and seed["minimum"] == 0
    for path, node in _walk(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
        assert node.get("maximum", 0) < 2**53, path
