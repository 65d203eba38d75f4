"""Helm for real: the chart installed into the real API server (fixture `e2e_run`).

`helm install --wait` created the CRD, the RBAC and the Deployment; the node stand-in ran
the operator pod (the image's entrypoint, `python -m merit_operator`, with the chart's
ServiceAccount token); the example run became Ready under `kubectl wait`; `helm upgrade`
with a CRD that gained a printer column changed the CRD on the server; `kubectl explain`
shows the schema's descriptions; `helm uninstall` removed the operator and kept the CRD
(and so every MeritRun in the cluster).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from support.kube import CRD_PATH

pytestmark = pytest.mark.slow


def test_helm_install_deployed_and_the_node_runs_the_operator_pod(e2e_run):
    chart = e2e_run.chart
    assert "STATUS: deployed" in chart["install"]
    assert any(p.startswith("mr-meritrun-") for p in chart["pods_after_install"]), chart


def test_kubectl_wait_saw_the_run_ready(e2e_run):
    done = e2e_run.chart["wait"]
    assert done.returncode == 0, done.stderr
    assert "condition met" in done.stdout


def test_helm_upgrade_changes_the_crd_on_the_server(e2e_run):
    crd = e2e_run.chart["crd_after_upgrade"]
    columns = [c["name"] for v in crd["spec"]["versions"]
               for c in v.get("additionalPrinterColumns") or []]
    assert "Upgraded" in columns, f"helm upgrade left the CRD as it was: {columns}"


def explained_fields(explain: str) -> dict[str, str]:
    """kubectl explain's FIELDS section: field name -> its text (type line and description)."""
    fields, name = {}, None
    for line in explain.split("FIELDS:", 1)[-1].splitlines():
        match = re.match(r"^  (\w+)\t", line)
        if match:
            name = match.group(1)
            fields[name] = line
        elif name:
            fields[name] += " " + line.strip()
    return fields


def test_kubectl_explain_shows_descriptions_and_defaults(e2e_run):
    schema = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]
    training = schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    fields = explained_fields(e2e_run.chart["explain"])
    assert fields.keys() == training["properties"].keys()
    for name, prop in training["properties"].items():
        first_words = " ".join(prop["description"].split()[:3])
        assert first_words in fields[name], (name, first_words)
        if "default" in prop:
            shown = json.dumps(prop["default"]).strip('"')
            assert f"Default: {shown}" in fields[name], (name, fields[name])


def test_helm_uninstall_removes_the_operator_and_keeps_the_crd(e2e_run):
    left = e2e_run.chart["left_after_uninstall"]
    assert left["deployments"] == [] and left["running"] == []
    assert left["crd"] is True
