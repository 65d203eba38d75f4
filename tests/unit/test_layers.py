"""Layering: the core never imports torch or kopf; the operator never imports torch; the
pipeline loads no network client; the import-linter contracts in pyproject.toml hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["meritrun.api", "meritrun.pipeline", "meritrun.jobs", "meritrun.crd",
        "meritrun.validation", "meritrun.local", "meritrun.cli", "meritrun.storage",
        "meritrun.textenc", "meritrun.partitioning", "meritrun.access", "meritrun.assignment",
        "meritrun.signing", "meritrun.keys", "meritrun.driver"]


def _imported(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", CORE)
def test_core_imports_neither_torch_nor_kopf(module):
    loaded = _imported(module)
    assert "torch" not in loaded and "kopf" not in loaded


def test_operator_does_not_import_torch():
    loaded = _imported("merit_operator.handlers")
    assert "kopf" in loaded and "torch" not in loaded and "transformers" not in loaded


def test_the_pipeline_imports_without_a_network_client():
    """`import meritrun.pipeline` works where minio is not installed (a blocked import)."""
    code = ("import sys; sys.modules['minio'] = None; sys.modules['urllib3'] = None; "
            "import meritrun.pipeline, meritrun.pipeline.jobs; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([lint, "--config", str(repo / "pyproject.toml")], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "0 broken" in out.stdout
