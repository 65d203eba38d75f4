"""The generated CRD on a real kube-apiserver (issue 13 item 7): it is accepted as a structural
schema, its defaults are applied, and its CEL rules refuse bad objects at admission, including
edits to what a live run may not change."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from support.kube import install_crd


def run_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "s3://m/base"}, "data": {"uri": "s3://d/x.jsonl"},
                     **spec}}


@pytest.fixture(scope="module")
def plane(control_plane):
    install_crd(control_plane)
    namespace = control_plane.create_namespace("crd")
    yield control_plane, namespace
    control_plane.delete_namespace(namespace, wait=False)  # no operator serves it


def apply(plane, doc: dict[str, Any]):
    control_plane, namespace = plane
    return control_plane.kubectl("apply", "-f", "-", namespace=namespace, check=False,
                                 stdin=yaml.safe_dump(doc))


def test_defaults_are_applied_and_explained(plane):
    control_plane, namespace = plane
    assert apply(plane, run_doc("defaults")).returncode == 0
    got = json.loads(control_plane.kubectl("get", "meritrun", "defaults", "-o", "json",
                                           namespace=namespace).stdout)["spec"]
    assert got["training"]["learningRate"] == 0.0003
    assert got["partitioning"]["strategy"] == "conflictPCA"
    assert got["merge"]["method"] == "tokenWeighted" and got["backoffLimit"] == 2
    explained = control_plane.kubectl("explain", "meritrun.spec.training",
                                      namespace=namespace).stdout
    assert "AdamW peak learning rate. Default: 0.0003." in explained, explained


@pytest.mark.parametrize("name,spec,message", [
    ("manual", {"partitioning": {"strategy": "manual"}},
     "strategy manual needs partitioning.assignments"),
    ("nosite", {"data": {"sources": [{"name": "a", "uri": "s3://d/a", "site": "lab"}]}},
     "every data.sources[].site must name an entry of spec.sites"),
    ("sketch", {"partitioning": {"strategy": "bySite"},
                "data": {"sources": [{"name": "a", "uri": "s3://d/a"}]},
                "sites": [{"name": "lab", "sketches": True}]},
     "no source in data.sources lives at that site"),
    ("otalora", {"merge": {"method": "ota"}, "training": {"method": "lora"}},
     "merge.method ota needs full fine-tuning"),
    ("pcapull", {"data": {"sources": [{"name": "a", "site": "lab"}]},
                 "sites": [{"name": "lab"}]}, "conflictPCA needs every source's data"),
    ("x" * 41, {}, "metadata.name: at most 40 characters"),
    ("micro", {"training": {"batchSize": 8, "microBatchSize": 3}},
     "microBatchSize must divide batchSize"),
    ("seed", {"training": {"seed": 2**80}}, "spec.training.seed"),
    ("snake", {"training": {"learning_rate": 0.1}}, 'unknown field "spec.training.learning_rate"'),
    ("kebab", {"merge": {"method": "token-weighted"}}, 'Unsupported value: "token-weighted"'),
])
def test_cel_rules_refuse_at_admission(plane, name, spec, message):
    done = apply(plane, run_doc(name, **spec))
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_int64_seeds_are_admitted(plane):
    assert apply(plane, run_doc("seedmax", training={"seed": 2**63 - 1})).returncode == 0


def test_named_lists_are_maps(plane):
    done = apply(plane, run_doc("dup", data={"sources": [{"name": "a", "uri": "s3://d/a"},
                                                         {"name": "a", "uri": "s3://d/b"}]}))
    assert done.returncode != 0 and "Duplicate value" in done.stderr, done.stderr


def test_a_live_run_refuses_edits_to_its_plan_inputs(plane):
    assert apply(plane, run_doc("live")).returncode == 0
    done = apply(plane, run_doc("live", training={"learningRate": 0.001}))
    assert done.returncode != 0
    assert "spec.training cannot change once the run exists" in done.stderr, done.stderr
    done = apply(plane, run_doc("live", sites=[{"name": "lab"}],
                                partitioning={"strategy": "bySite"}))
    assert done.returncode != 0 and "spec.sites cannot change" in done.stderr, done.stderr
    done = apply(plane, run_doc("live", merge={"method": "uniform"}))
    assert done.returncode != 0 and "spec.merge cannot change" in done.stderr, done.stderr
    # what may change does
    done = apply(plane, run_doc("live", suspend=True, backoffLimit=5,
                                activeDeadlineSeconds=600, deleteArtifacts=True))
    assert done.returncode == 0, done.stderr
