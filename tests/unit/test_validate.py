"""`meritrun validate`: good files pass, each kind of mistake is named by its field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meritrun.cli import main
from meritrun.errors import SpecError
from meritrun.validation import document_errors, load_run, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
GOOD = {"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": "r"},
        "spec": {"baseModel": {"uri": "s3://m/base"}, "data": {"uri": "s3://d/x.jsonl"}}}


def with_spec(**spec) -> dict:
    return {**GOOD, "spec": {**GOOD["spec"], **spec}}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("doc,expected", [
    (with_spec(training={"learningRate": 0}), "spec.training.learningRate:"),
    (with_spec(training={"method": "qlora"}), "spec.training.method:"),
    (with_spec(partitioning={"strategy": "kmeans"}), "spec.partitioning.strategy:"),
    (with_spec(partitioning={"axes": 9}), "spec.partitioning.axes:"),
    (with_spec(merge={"quorum": 1.5}), "spec.merge.quorum:"),
    (with_spec(training={"batchSze": 8}),
     "spec.training.batchSze: unknown field; did you mean `batchSize`?"),
    (with_spec(partitioning={"strategy": "manual"}), "needs partitioning.assignments"),
    (with_spec(mixtureSearch={"enabled": True}), "needs data.heldOutUri"),
    (with_spec(merge={"method": "ota"}, training={"method": "lora"}), "ota needs full"),
    (with_spec(data={"sources": [{"name": "a", "site": "x"}]}), "not in spec.sites"),
    ({**GOOD, "kind": "Job"}, "kind: expected MeritRun"),
    ({k: v for k, v in GOOD.items() if k != "spec"}, "'spec' is a required property"),
    ({**GOOD, "metadata": {"name": "Bad_Name"}}, "metadata.name"),
])
def test_bad_documents_name_the_field(doc, expected):
    errors = document_errors(doc)
    assert any(expected in e for e in errors), errors


def test_cli_exits_nonzero_and_names_the_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_spec(training={"epochs": -1})))
    assert main(["validate", str(bad)]) == 1
    assert "spec.training.epochs" in capsys.readouterr().err


def test_unreadable_yaml_is_reported(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("spec: [unclosed\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"{bad}: not valid YAML at line 2, column 1: expected ',' or ']', but got " \
                  "'<stream end>'\n"


def test_load_run_raises_spec_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_spec(backoffLimit=-1)))
    with pytest.raises(SpecError, match="spec.backoffLimit"):
        load_run(path)


def test_parse_spec_names_first_bad_field():
    with pytest.raises(SpecError) as info:
        parse_spec({"baseModel": {"uri": "x"}, "data": {"uri": "y"}, "merge": {"quorum": 0}})
    assert info.value.path == "spec.merge.quorum"
