"""The Helm chart: lints strictly, renders valid Kubernetes objects, keeps its CRD in step
with the API models, rejects bad values, and its dashboard queries metrics that exist."""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml
from support.kube import REPO

from merit_operator.metrics import Metrics
from meritrun.crd import build_crd

CHART = REPO / "charts" / "meritrun"
VARIANTS = {
    "defaults": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "everything": ["--set", "minio.enabled=true", "--set", "minio.persistence.enabled=true",
                   "--set", "dashboards.enabled=true", "--set", "remoteSites.enabled=true",
                   "--set", "metrics.serviceMonitor.enabled=true",
                   "--set", "admissionPolicy.enabled=true"],
}


def render(helm, *args: str) -> list[dict]:
    out = helm.run("template", "mr", str(CHART), "--namespace", "meritrun-system",
                   "--include-crds", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_strict_is_clean(helm):
    done = helm.run("lint", "--strict", str(CHART), *VARIANTS["everything"])
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_are_valid_kubernetes(helm, variant):
    docs = render(helm, *VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD of the Prometheus Operator: no schema offline
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_chart_crd_is_the_generated_one_as_a_kept_template(helm):
    chart_crd = (CHART / "files" / "meritrun-crd.yaml").read_text()
    assert chart_crd == (REPO / "crds" / "meritrun.yaml").read_text()
    (rendered,) = [d for d in render(helm) if d["kind"] == "CustomResourceDefinition"]
    meta = rendered.pop("metadata")
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}  # survives uninstall
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # upgraded by helm
    assert {**rendered, "metadata": {"name": meta["name"]}} == build_crd()
    assert not any(d["kind"] == "CustomResourceDefinition"
                   for d in render(helm, "--set", "crd.install=false"))


def test_operator_runs_once_with_the_settings_it_needs(helm):
    (deploy,) = [d for d in render(helm) if d["kind"] == "Deployment"]
    # Two replicas, one acting: the Lease is in the release's namespace.
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MERITRUN_LEADER_ELECTION"]["value"] == "true"
    assert env["MERITRUN_LEASE_NAMESPACE"]["value"] == "meritrun-system"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    single = [d for d in render(helm, "--set", "operator.leaderElection=false")
              if d["kind"] == "Deployment"][0]["spec"]
    assert single["replicas"] == 1 and single["strategy"]["type"] == "Recreate"
    assert env["MERITRUN_NAMESPACES"]["value"] == ""
    assert env["MERITRUN_TRAINER_IMAGE"]["value"].startswith("ghcr.io/")
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "meritrun-storage"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_no_secret_access_unless_remote_sites_are_enabled(helm):
    def secret_rules(docs):
        return [r for d in docs if d["kind"] in ("Role", "ClusterRole")
                for r in d["rules"] if "secrets" in r["resources"]]

    assert secret_rules(render(helm)) == []
    assert secret_rules(render(helm, "--set", "remoteSites.enabled=true"))[0]["verbs"] == ["get"]


def test_namespaced_install_grants_namespaced_rights_only_there(helm):
    docs = render(helm, *VARIANTS["namespaced"])
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == [
        "meritrun-system", "team-a", "team-b"]  # the leader election Lease, and the served
    assert [r["rules"][0]["resources"] for r in roles if r["metadata"]["name"].endswith(
        "-leader")] == [["leases"]]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    assert not [d["metadata"]["name"] for d in docs if d["kind"] in cluster_scoped]


@pytest.mark.parametrize("bad", ["operator.workers=0", "image.pullPolicy=Sometimes",
                                 "watchNamespaces={Not_A_Namespace}", "minio.rootPassword=short"])
def test_values_schema_rejects_bad_values(helm, bad):
    done = helm.run("template", "mr", str(CHART), "--set", bad, check=False)
    assert done.returncode != 0 and "schema" in done.stderr.lower(), done.stderr


def test_dashboard_queries_only_existing_metrics():
    dashboard = json.loads((CHART / "dashboards" / "meritrun-grafana.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmeritrun_[a-z_]+", e)}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                "info": ["_info"], "gauge": [""]}
    exposed = {f.name + suffix for f in Metrics().registry.collect()
               for suffix in suffixes[f.type]}
    assert used and used <= exposed, used - exposed


def test_admission_policy_is_opt_in_and_names_what_it_allows(helm):
    assert not [d for d in render(helm) if d["kind"].startswith("ValidatingAdmissionPolicy")]
    docs = render(helm, "--set", "admissionPolicy.enabled=true",
                  "--set", "admissionPolicy.allowedImagePrefixes={registry.example/ml/}",
                  "--set", "admissionPolicy.allowedServiceAccounts={trainer}",
                  "--set", "watchNamespaces={team-a}")
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    allowed = json.loads(policy["spec"]["variables"][0]["expression"])
    assert allowed[-1] == "registry.example/ml/" and allowed[0].startswith("ghcr.io/")
    exprs = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "template.image" in exprs and "template.mergeImage" in exprs
    assert 'serviceAccountName in ["trainer"]' in exprs
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0][
        "values"] == ["team-a"]
