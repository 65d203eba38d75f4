"""Bad values are refused up front by `meritrun validate` and `meritrun run --local`, each
naming the spec field (issue 16 item 4, issue 12 points 6 and 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meritrun.api import MeritRunSpec
from meritrun.api.limits import MAX_SEARCH_CANDIDATES, SEED_MAX
from meritrun.api.rules import immutable_changes
from meritrun.cli import main

HEAD = "apiVersion: merit.run/v1alpha1\nkind: MeritRun\nmetadata: {name: r}\n"
BASE = {"baseModel": {"uri": "s3://m/base"}, "data": {"uri": "s3://d/x.jsonl"}}


def write(tmp_path: Path, spec: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    body = spec if isinstance(spec, str) else yaml.safe_dump({"spec": {**BASE, **spec}})
    path.write_text(HEAD + body)
    return path


def validate(capsys, path: Path) -> tuple[int, str]:
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


NON_FINITE = [
    ("training", "learningRate"), ("training", "epochs"), ("training", "weightDecay"),
    ("merge", "scale"), ("merge", "outlierFactor"), ("merge", "quorum"),
]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("section,field", NON_FINITE)
def test_non_finite_numbers_are_refused(tmp_path, capsys, section, field, value):
    path = write(tmp_path, f"spec:\n  baseModel: {{uri: s3://m/b}}\n  data: {{uri: s3://d/x}}\n"
                           f"  {section}: {{{field}: {value}}}\n")
    code, out = validate(capsys, path)
    assert code == 1
    assert f"spec.{section}.{field}:" in out, out
    assert "params.json" not in out


@pytest.mark.parametrize("field", ["epsilon", "power"])
def test_ota_infinities_are_refused_before_training(tmp_path, capsys, field):
    path = write(tmp_path, "spec:\n  baseModel: {uri: s3://m/b}\n  data: {uri: s3://d/x}\n"
                           f"  merge: {{method: ota, ota: {{{field}: .inf}}}}\n")
    code, out = validate(capsys, path)
    assert code == 1 and f"spec.merge.ota.{field}: must be a finite number" in out, out


@pytest.mark.parametrize("section", ["training", "profiling", "partitioning", "mixtureSearch"])
def test_seeds_stay_within_int64(tmp_path, capsys, section):
    assert validate(capsys, write(tmp_path, {section: {"seed": SEED_MAX}}))[0] == 0
    code, out = validate(capsys, write(tmp_path, {section: {"seed": 2**80}}))
    assert code == 1 and f"spec.{section}.seed:" in out, out
    code, out = validate(capsys, write(tmp_path, {section: {"seed": -1}}))
    assert code == 1 and f"spec.{section}.seed:" in out, out


@pytest.mark.parametrize("spec,field", [
    ({"mixtureSearch": {"grid": 10**6}}, "spec.mixtureSearch.grid"),
    ({"mixtureSearch": {"dirichlet": 10**6}}, "spec.mixtureSearch.dirichlet"),
    ({"profiling": {"calibrationSamples": 10**9}}, "spec.profiling.calibrationSamples"),
    ({"profiling": {"projectionDim": 2**30}}, "spec.profiling.projectionDim"),
    ({"partitioning": {"axes": 7}}, "spec.partitioning.axes"),
    ({"partitioning": {"partitions": 65}}, "spec.partitioning.partitions"),
    ({"training": {"batchSize": 10**6}}, "spec.training.batchSize"),
    ({"training": {"maxSeqLen": 2**30}}, "spec.training.maxSeqLen"),
    ({"backoffLimit": 10**6}, "spec.backoffLimit"),
    ({"sites": [{"name": f"s{i}"} for i in range(65)]}, "spec.sites"),
])
def test_counts_are_bounded(tmp_path, capsys, spec, field):
    code, out = validate(capsys, write(tmp_path, spec))
    assert code == 1 and f"{field}:" in out, out


def test_search_grid_is_bounded_by_its_candidates_for_the_planned_k(tmp_path, capsys):
    # K = 4 with grid 2000 used to exhaust memory: now refused, naming the bound
    spec = {"data": {"uri": "s3://d/x", "heldOutUri": "s3://d/h"},
            "partitioning": {"axes": 2}, "mixtureSearch": {"enabled": True, "grid": 100}}
    code, out = validate(capsys, write(tmp_path, spec))
    assert code == 1 and f"at most {MAX_SEARCH_CANDIDATES}" in out and "grid 100" in out, out
    spec["partitioning"] = {"axes": 1}  # K = 2: 99 candidates
    assert validate(capsys, write(tmp_path, spec))[0] == 0


def test_source_and_site_names_are_unique(tmp_path, capsys):
    code, out = validate(capsys, write(tmp_path, {"data": {"sources": [
        {"name": "a", "uri": "s3://d/a"}, {"name": "a", "uri": "s3://d/b"}]}}))
    assert code == 1 and "sources[1].name 'a' repeats sources[0]" in out, out
    code, out = validate(capsys, write(tmp_path, {
        "partitioning": {"strategy": "bySite"},
        "data": {"sources": [{"name": "a", "site": "lab"}]},
        "sites": [{"name": "lab"}, {"name": "lab"}]}))
    assert code == 1 and "sites[1].name 'lab' repeats sites[0]" in out, out


@pytest.mark.parametrize("name", ["../../evil", "a/b", "Lab Ü", "-x", "x" * 64, "UPPER"])
def test_site_names_are_dns_labels(tmp_path, capsys, name):
    code, out = validate(capsys, write(tmp_path, {"sites": [{"name": name}]}))
    assert code == 1 and "spec.sites[0].name:" in out, out
    assert "DNS label" in out or "longer than 63 characters" in out, out


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x y"])
def test_source_names_are_safe_key_parts(tmp_path, capsys, name):
    code, out = validate(capsys, write(tmp_path, {"data": {"sources": [
        {"name": name, "uri": "s3://d/a"}]}}))
    assert code == 1 and "spec.data.sources[0].name:" in out, out


@pytest.mark.parametrize("spec,expected", [
    ({"training": {"learning_rate": 1e-3}},
     "spec.training.learning_rate: unknown field; did you mean `learningRate`?"),
    ({"trainig": {}}, "spec.trainig: unknown field; did you mean `training`?"),
    ({"merge": {"method": "token-weighted"}}, "did you mean `tokenWeighted`? (kebab-case"),
    ({"base_model": {"uri": "s3://m"}},
     "spec.base_model: unknown field; did you mean `baseModel`?"),
])
def test_only_the_crd_field_names_with_a_hint(tmp_path, capsys, spec, expected):
    code, out = validate(capsys, write(tmp_path, spec))
    assert code == 1 and expected in out, out
    assert "Extra inputs are not permitted" not in out


def test_yaml_that_is_not_utf8_gets_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    raw = (HEAD + "spec: {baseModel: {uri: caf\xe9}}\n").encode("latin-1")
    path.write_bytes(raw)
    code, out = validate(capsys, path)
    at = raw.index(b"\xe9")
    assert code == 1 and out == (f"{path}: not UTF-8 text (byte {at}: "
                                 "b'\\xe9'); save the file as UTF-8\n")


def test_deeply_nested_yaml_gets_one_line(tmp_path, capsys):
    for depth in (100, 100_000):  # within Python's recursion limit, and far past it
        path = tmp_path / f"deep{depth}.yaml"
        path.write_text(HEAD + "spec: " + "[" * depth + "]" * depth + "\n")
        code, out = validate(capsys, path)
        assert code == 1 and out == f"{path}: YAML nests deeper than 64 levels\n", out[:300]


def test_an_alias_bomb_gets_one_line(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(HEAD + "spec:\n" + "".join(f"  {line}\n" for line in lines))
    code, out = validate(capsys, path)
    assert code == 1 and out == f"{path}: YAML holds more than 100000 values (aliases count " \
                                "each use)\n", out[:300]


def test_a_missing_file_is_named_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = validate(capsys, Path("nosuch.yaml"))
    assert code == 1 and out == "nosuch.yaml: cannot read: No such file or directory\n"


def test_local_paths_must_exist(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("")
    spec = {"baseModel": {"uri": "nosuch-model"},
            "data": {"uri": "train.jsonl", "heldOutUri": f"file://{tmp_path}/held.jsonl"}}
    code, out = validate(capsys, write(tmp_path, spec))
    assert code == 1
    assert f"spec.baseModel.uri: {tmp_path}/nosuch-model does not exist" in out, out
    assert f"spec.data.heldOutUri: {tmp_path}/held.jsonl does not exist" in out
    assert "spec.data.uri" not in out  # exists, relative to the YAML file
    assert main(["validate", "--no-path-check", str(tmp_path / "r.yaml")]) == 0


def test_run_local_refuses_missing_paths_before_starting(tmp_path, capsys):
    path = write(tmp_path, {"baseModel": {"uri": "nosuch-model"}, "data": {"uri": "x.jsonl"}})
    work = tmp_path / "work"
    assert main(["run", str(path), "--local", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "spec.baseModel.uri:" in err and "spec.data.uri:" in err
    assert not work.exists()


@pytest.mark.parametrize("command", [["run", "r.yaml", "--local"], ["demo"]])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_parallel_must_be_at_least_one(capsys, command, value):
    with pytest.raises(SystemExit) as info:
        main([*command, "--parallel", value])
    assert info.value.code == 2
    assert "argument --parallel:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "validate"], ["validate", "-v"],
                                  ["validate", "--verbose"]])
def test_verbose_anywhere(tmp_path, capsys, argv):
    path = write(tmp_path, {})
    assert main([*argv, str(path)]) == 0
    assert "r: valid" in capsys.readouterr().out


@pytest.mark.parametrize("argv,shown", [
    (["run", "--help"], ["(default: meritrun-work)", "(default: 1)"]),
    (["merge", "--help"], ["(default: 1.0)", "(default: 2000)"]),
    (["profile", "--help"], ["(default: 200)", "(default: attention)"]),
])
def test_help_shows_defaults(capsys, argv, shown):
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert all(s in out for s in shown), out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_immutable_changes_name_the_fields():
    old = MeritRunSpec.model_validate(BASE)
    new = old.model_copy(update={
        "training": old.training.model_copy(update={"learning_rate": 1e-3}),
        "merge": old.merge.model_copy(update={"method": "uniform", "quorum": 0.5}),
        "suspend": True, "backoff_limit": 5})
    assert immutable_changes(old, new) == ["spec.training", "spec.merge"]
    assert immutable_changes(old, old) == []


def test_every_spec_field_is_either_mutable_or_immutable():
    from meritrun.api.rules import IMMUTABLE_FIELDS, MUTABLE_FIELDS

    fields = {f.alias or name for name, f in MeritRunSpec.model_fields.items()}
    assert set(IMMUTABLE_FIELDS) | set(MUTABLE_FIELDS) == fields
    assert not set(IMMUTABLE_FIELDS) & set(MUTABLE_FIELDS)


@pytest.mark.parametrize("spec,path,words", [
    ({"training": {"learning_rate": 1e-3}}, "spec.training.learning_rate",
     "did you mean `learningRate`"),
    ({"merge": {"method": "ota", "ota": {"epsilon": float("inf")}}}, "spec.merge.ota.epsilon",
     "finite"),
    ({"training": {"seed": 2**63}}, "spec.training.seed", "less than or equal"),
    ({"sites": [{"name": "a/b"}]}, "spec.sites[0].name", "'a/b' must be a DNS label"),
    ({"training": {"nodes": 0}}, "spec.training.nodes", "greater than or equal to 1"),
    ({"training": {"batchSize": 8, "microBatchSize": 3}}, "spec.training",
     "training.microBatchSize 3 does not divide training.batchSize 8"),
    ({"training": {"batchSize": 4, "microBatchSize": 8}}, "spec.training",
     "training.microBatchSize 8 is larger than training.batchSize 4"),
])
def test_the_operators_spec_parser_says_the_same(spec, path, words):
    from meritrun.errors import SpecError
    from meritrun.validation import parse_spec

    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, **spec})
    assert info.value.path == path and words in info.value.reason, info.value


@pytest.mark.parametrize("spec,field", [
    ({"training": {"nodes": 10**6}}, "spec.training.nodes"),
    ({"training": {"microBatchSize": 10**6}}, "spec.training.microBatchSize"),
    ({"training": {"maxGradNorm": float("inf")}}, "spec.training.maxGradNorm"),
    ({"template": {"workVolume": "../x"}}, "spec.template.workVolume"),
])
def test_training_and_template_fields_are_bounded(tmp_path, capsys, spec, field):
    code, out = validate(capsys, write(tmp_path, spec))
    assert code == 1 and f"{field}:" in out, out


@pytest.mark.parametrize("body,field", [
    ("  training: {learningRate: .inf}\n", "spec.training.learningRate: must be a finite"),
    ("  training: {learning_rate: 0.1}\n", "did you mean `learningRate`"),
    ("  sites: [{name: Lab}]\n", "spec.sites[0].name: 'Lab' must be a DNS label"),
    ("  mixtureSearch: {grid: 1000000}\n", "spec.mixtureSearch.grid"),
])
def test_run_local_refuses_bad_values_before_starting(tmp_path, capsys, body, field):
    path = write(tmp_path, "spec:\n  baseModel: {uri: s3://m/b}\n  data: {uri: s3://d/x}\n"
                           + body)
    work = tmp_path / "work"
    assert main(["run", str(path), "--local", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1, err
    assert not work.exists()
