"""Layering: the core never imports torch or kopf; the operator never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = ["meritrun.api", "meritrun.pipeline", "meritrun.jobs", "meritrun.crd",
        "meritrun.validation", "meritrun.local", "meritrun.cli", "meritrun.storage",
        "meritrun.textenc", "meritrun.partitioning", "meritrun.access", "meritrun.assignment",
        "meritrun.signing", "meritrun.keys"]


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
