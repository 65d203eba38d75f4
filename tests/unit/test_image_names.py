"""One image naming scheme everywhere (issue 12, point 4): the README, the chart's values, the
operator's defaults, the Dockerfiles' build comments, the cluster quickstart and the examples
all name `ghcr.io/meritrun/meritrun-<operator|trainer|merger>:<chart appVersion>`, and every
`docker build` in the docs builds an existing Dockerfile under the name its image has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = yaml.safe_load((ROOT / "charts/meritrun/Chart.yaml").read_text())
VERSION = CHART["appVersion"]
CANONICAL = {kind: f"ghcr.io/meritrun/meritrun-{kind}:{VERSION}"
             for kind in ("operator", "trainer", "merger")}
DOCKERFILE_OF = {"operator": "operator/Dockerfile", "trainer": "trainer_image/Dockerfile",
                 "merger": "merger_image/Dockerfile"}
# Any mention of one of our images: a registry path ending in meritrun-<kind> or <kind>.
IMAGE_REF = re.compile(r"[\w.\-/$]*meritrun[\w.\-/]*?/(?:meritrun-)?(operator|trainer|merger)"
                       r"(?::[\w.$]+)?")
TEXT_FILES = [ROOT / "README.md", ROOT / "docs/quickstart-cluster.md",
              ROOT / "docs/operator.md", *sorted((ROOT / "examples").glob("*.yaml")),
              ROOT / "charts/meritrun/values.yaml",
              *(ROOT / p for p in DOCKERFILE_OF.values())]


def test_chart_version_is_the_package_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(VERSION)}"$', pyproject, re.M)


def test_chart_values_and_operator_defaults_use_the_canonical_names():
    from merit_operator.settings import Settings

    values = yaml.safe_load((ROOT / "charts/meritrun/values.yaml").read_text())
    assert f"{values['image']['repository']}:{VERSION}" == CANONICAL["operator"]
    assert values["jobImages"] == {"trainer": CANONICAL["trainer"],
                                   "merger": CANONICAL["merger"]}
    settings = Settings()
    assert (settings.trainer_image, settings.merger_image) == (CANONICAL["trainer"],
                                                               CANONICAL["merger"])


def test_every_image_mentioned_in_docs_and_examples_is_canonical():
    seen = set()
    for path in TEXT_FILES:
        for match in IMAGE_REF.finditer(path.read_text()):
            ref = match.group(0)
            if "$" in ref:  # a shell template: checked by the docker build test below
                continue
            kind = match.group(1)
            if ":" not in ref.split("/")[-1]:  # a repository without a tag (values.yaml)
                assert ref == CANONICAL[kind].rsplit(":", 1)[0], f"{path.name}: {ref}"
            else:
                assert ref == CANONICAL[kind], f"{path.name}: {ref} is not {CANONICAL[kind]}"
            seen.add((path.name, kind))
    assert {k for name, k in seen if name == "README.md"} >= {"trainer", "merger"}
    assert {k for name, k in seen if name == "Dockerfile"} == set(CANONICAL)


def test_docker_builds_in_the_docs_match_the_dockerfiles():
    builds = []
    for path in (ROOT / "docs/quickstart-cluster.md", *(ROOT / p for p in DOCKERFILE_OF.values())):
        text = path.read_text().replace("\\\n", " ")
        builds += re.findall(r"docker build -f (\S+)\s+-t (\S+)", text)
    assert {f for f, _ in builds} == set(DOCKERFILE_OF.values())
    for dockerfile, tag in builds:
        kind = next(k for k, f in DOCKERFILE_OF.items() if f == dockerfile)
        assert (ROOT / dockerfile).is_file()
        assert tag.replace("$VERSION", VERSION) == CANONICAL[kind], (dockerfile, tag)
    entry = {k: re.search(r'^ENTRYPOINT \["python", "-m", "([\w.]+)"',
                          (ROOT / f).read_text(), re.M).group(1)
             for k, f in DOCKERFILE_OF.items()}
    assert entry == {"operator": "merit_operator", "trainer": "merit_trainer.stage",
                     "merger": "merit_merger.stage"}


def test_quickstart_walks_the_whole_cluster_path():
    text = (ROOT / "docs/quickstart-cluster.md").read_text()
    for step in ("kind load docker-image", "docker push", "helm install meritrun charts/meritrun",
                 "kubectl apply -n meritrun-system -f examples/meritrun-s3.yaml",
                 "get meritruns", "describe meritrun", "logs job/tiny-s3-p0-a1",
                 "{.status.modelUri}", "helm upgrade meritrun",
                 "meritrun crd | kubectl apply --server-side -f -"):
        assert step in text, step
    assert (ROOT / "examples/meritrun-s3.yaml").is_file()
    # the CRD the upgrade step relies on is a template Helm upgrades, not a crds/ file
    assert (ROOT / "charts/meritrun/templates/crd.yaml").is_file()
    assert not (ROOT / "charts/meritrun/crds").exists()
