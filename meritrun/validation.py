"""Checking MeritRun documents: the CRD's schema first, then the models' cross-field rules.

Every error names the field path (`spec.training.learningRate: ...`), so `meritrun validate`,
the local runner and the operator's InvalidSpec condition all say where the problem is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from pydantic import ValidationError

from . import API_GROUP, API_VERSION
from .api import KIND, MeritRun, MeritRunSpec
from .crd import build_crd
from .errors import SpecError

_validator: Draft4Validator | None = None


def _schema_validator() -> Draft4Validator:
    global _validator
    if _validator is None:
        schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        _validator = Draft4Validator(schema)
    return _validator


def _dotted(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def pydantic_errors(error: ValidationError, *, prefix: str) -> list[str]:
    messages = []
    for e in error.errors():
        loc = [p for p in e["loc"] if p not in ("function-after",)]
        path = _dotted([prefix, *loc]) if prefix else _dotted(loc)
        messages.append(f"{path}: {e['msg']}")
    return messages


def document_errors(doc: Any) -> list[str]:
    """Every problem of one decoded MeritRun document, each naming its field path."""
    if not isinstance(doc, dict):
        return ["document: expected a mapping"]
    errors = []
    if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        errors.append(f"apiVersion: expected {API_GROUP}/{API_VERSION}, "
                      f"got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        errors.append(f"kind: expected {KIND}, got {doc.get('kind')!r}")
    for e in sorted(_schema_validator().iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = _dotted(e.absolute_path) or "document"
        errors.append(f"{path}: {e.message}")
    try:
        MeritRun.model_validate(doc)
    except ValidationError as e:
        # The models add what a CRD schema cannot say: unknown fields, cross-field rules.
        seen = {m.partition(": ")[0] for m in errors}
        errors += [m for m in pydantic_errors(e, prefix="") if m.partition(": ")[0] not in seen]
    return errors


def parse_spec(spec: Any) -> MeritRunSpec:
    """A spec dict -> model, or SpecError naming the first bad field (for the operator)."""
    try:
        return MeritRunSpec.model_validate(spec)
    except ValidationError as e:
        first = pydantic_errors(e, prefix="spec")[0]
        path, _, message = first.partition(": ")
        raise SpecError(message, path=path) from e


def load_documents(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"cannot read YAML: {e}", path=str(path)) from e


def load_run(path: Path) -> MeritRun:
    """The single MeritRun in a YAML file, fully validated."""
    runs = [d for d in load_documents(path) if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise SpecError(f"expected exactly one {KIND} document, found {len(runs)}",
                        path=str(path))
    errors = document_errors(runs[0])
    if errors:
        raise SpecError("; ".join(errors), path=str(path))
    return MeritRun.model_validate(runs[0])
