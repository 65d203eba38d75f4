"""Checking MeritRun documents: the CRD's schema first, then the models' cross-field rules.

Every error names the field path (`spec.training.learningRate: ...`), so `meritrun validate`,
the local runner and the operator's InvalidSpec condition all say where the problem is. Field
names are exactly the CRD's (camelCase): the models are validated by alias only here, and an
unknown field gets "did you mean" instead of pydantic's "Extra inputs are not permitted".
Whether local files exist is checked by `missing_local_paths`, which only the CLI can run
(the operator has no local files; s3:// is not checked offline).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from . import API_GROUP, API_VERSION
from .api import KIND, MeritRun, MeritRunSpec
from .api.fields import DNS_LABEL, SOURCE_NAME
from .crd import build_crd
from .errors import SpecError

MAX_DEPTH = 64  # a MeritRun nests about 6 deep; deeper is a mistake, or an attack on recursion
MAX_VALUES = 100_000  # a MeritRun within every bound of meritrun.api.limits holds far fewer
_validator: Draft4Validator | None = None
_PATTERN_WORDS = {
    DNS_LABEL: "must be a DNS label: lower-case letters, digits and '-', starting and ending "
               "with a letter or digit",
    SOURCE_NAME: "may hold letters, digits, '.', '_' and '-', starting and ending with a "
                 "letter or digit",
}


def _document_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _schema_validator() -> Draft4Validator:
    global _validator
    if _validator is None:
        _validator = Draft4Validator(_document_schema())
    return _validator


def _dotted(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _schema_at(loc: list[Any]) -> dict[str, Any]:
    """The CRD schema node at a document path (empty when the path leaves the schema)."""
    node = _document_schema()
    for part in loc:
        node = (node.get("items") if isinstance(part, int)
                else (node.get("properties") or {}).get(part)) or {}
    return node


def _suggest(name: str, known: list[str]) -> str | None:
    if to_camel(name) in known and to_camel(name) != name:
        return to_camel(name)
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_field_message(loc: list[Any]) -> str:
    """"unknown field" with the nearest field the CRD knows at that place, if any."""
    name, known = str(loc[-1]), sorted(_schema_at(loc[:-1]).get("properties") or {})
    hint = _suggest(name, known)
    if hint:
        return f"unknown field; did you mean `{hint}`?"
    return "unknown field; known here: " + ", ".join(known) if known else "unknown field"


def _message(e: dict[str, Any], loc: list[Any]) -> str:
    if e["type"] == "extra_forbidden":
        return unknown_field_message(loc)
    if e["type"] == "finite_number":
        return "must be a finite number (not .inf or .nan)"
    pattern = (e.get("ctx") or {}).get("pattern")
    if e["type"] == "string_pattern_mismatch" and pattern in _PATTERN_WORDS:
        return f"{e['input']!r} {_PATTERN_WORDS[pattern]}"
    return str(e["msg"]).removeprefix("Value error, ")


def pydantic_errors(error: ValidationError, *, prefix: str) -> list[str]:
    messages = []
    for e in error.errors():
        loc = [*([prefix] if prefix else []), *(p for p in e["loc"] if p != "function-after")]
        messages.append(f"{_dotted(loc)}: {_message(e, loc)}")
    return messages


def _schema_message(e: Any) -> str:
    """jsonschema's message, with a hint when a kebab-case name stands for a camelCase enum."""
    if e.validator == "enum" and isinstance(e.instance, str):
        camel = to_camel(e.instance.replace("-", "_"))
        if camel in e.validator_value and camel != e.instance:
            return (f"{e.instance!r} is not one of {e.validator_value}; did you mean "
                    f"`{camel}`? (kebab-case names are for the CLI's flags only)")
    if e.validator == "maxLength":
        return f"{e.instance[:80]!r}... is longer than {e.validator_value} characters"
    if e.validator == "pattern" and e.validator_value in _PATTERN_WORDS:
        return f"{e.instance!r} {_PATTERN_WORDS[e.validator_value]}"
    return e.message


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
        errors.append(f"{path}: {_schema_message(e)}")
    try:
        MeritRun.model_validate(doc, by_alias=True, by_name=False)
    except ValidationError as e:
        # The models add what a CRD schema cannot say: unknown fields, cross-field rules.
        seen = {m.partition(": ")[0] for m in errors}
        errors += [m for m in pydantic_errors(e, prefix="") if m.partition(": ")[0] not in seen]
    return errors


def parse_spec(spec: Any) -> MeritRunSpec:
    """A spec dict -> model, or SpecError naming the first bad field (for the operator)."""
    try:
        return MeritRunSpec.model_validate(spec, by_alias=True, by_name=False)
    except ValidationError as e:
        first = pydantic_errors(e, prefix="spec")[0]
        path, _, message = first.partition(": ")
        raise SpecError(message, path=path) from e


def _too_big(node: Any) -> str | None:
    """Why decoded YAML is refused before any schema sees it: nested deeper than MAX_DEPTH,
    or more than MAX_VALUES values (aliases count each time they are used: a few lines of
    anchors can stand for billions of values). Walked iteratively, stopping at the limit."""
    seen, stack = 0, [(node, 1)]
    while stack:
        item, level = stack.pop()
        seen += 1
        if level > MAX_DEPTH:
            return f"YAML nests deeper than {MAX_DEPTH} levels"
        if seen > MAX_VALUES:
            return f"YAML holds more than {MAX_VALUES} values (aliases count each use)"
        children = item.values() if isinstance(item, dict) else (
            item if isinstance(item, list) else ())
        stack.extend((c, level + 1) for c in children)
    return None


def _yaml_where(e: yaml.YAMLError) -> str:
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None:
        return f": {' '.join(str(e).split())}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_documents(path: Path) -> list[Any]:
    """Every YAML document of a file; SpecError (naming the file once) for anything unreadable:
    missing, not UTF-8, not YAML, nested deeper than MAX_DEPTH."""
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", path=where) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "save the file as UTF-8", path=where) from e
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except RecursionError as e:
        raise SpecError(f"YAML nests deeper than {MAX_DEPTH} levels", path=where) from e
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML{_yaml_where(e)}", path=where) from e
    for doc in docs:
        problem = _too_big(doc)
        if problem:
            raise SpecError(problem, path=where)
    return docs


def _local_path(uri: str | None, base: Path) -> Path | None:
    """The file a URI names on this machine, or None for remote storage (s3://, http...)."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        return None
    return Path(uri) if Path(uri).is_absolute() else base / uri


def missing_local_paths(spec: MeritRunSpec, *, base: Path) -> list[str]:
    """`spec.<field>: <path> does not exist` for each local path a run would read."""
    data = spec.data
    fields = [("baseModel.uri", spec.base_model.uri), ("data.uri", data.uri),
              ("data.heldOutUri", data.held_out_uri)]
    fields += [(f"data.sources[{i}].uri", s.uri) for i, s in enumerate(data.sources or [])]
    errors = []
    for field, uri in fields:
        path = _local_path(uri, base)
        if path is not None and not path.exists():
            errors.append(f"spec.{field}: {path} does not exist (relative paths are relative "
                          "to the YAML file)")
    return errors


def run_documents(path: Path) -> list[dict[str, Any]]:
    docs = load_documents(path)
    return [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]


def load_run(path: Path, *, check_paths: bool = True) -> MeritRun:
    """The single MeritRun in a YAML file, fully validated (local paths too, by default)."""
    runs = run_documents(path)
    if len(runs) != 1:
        raise SpecError(f"expected exactly one {KIND} document, found {len(runs)}",
                        path=str(path))
    errors = document_errors(runs[0])
    if not errors:
        run = MeritRun.model_validate(runs[0], by_alias=True, by_name=False)
        if check_paths:
            errors = missing_local_paths(run.spec, base=path.resolve().parent)
    if errors:
        raise SpecError("; ".join(errors), path=str(path))
    return run
