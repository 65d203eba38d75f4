"""The MeritRun CRD, generated from the pydantic models so the two cannot drift.

pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references inlined,
`X | None` as `nullable`, numeric bounds in the OpenAPI 3.0 form, free-form maps marked
`x-kubernetes-preserve-unknown-fields`. `crds/meritrun.yaml` is this module's output; a test
keeps the file in step.
"""

from __future__ import annotations

from typing import Any

from . import API_GROUP, API_VERSION
from .api import KIND, PLURAL, SHORT_NAME, MeritRunSpec, MeritRunStatus
from .api._base import INT64_MAX

_KEEP = ("description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
         "minItems", "maxItems", "format", "x-kubernetes-validations", "x-kubernetes-list-type",
         "x-kubernetes-list-map-keys")
# metadata.name is the one part of metadata CEL may read; child Job names append to it.
_NAME_RULES = [
    {"rule": "self.metadata.name.size() <= 40",
     "message": "metadata.name: at most 40 characters (stage Job names append to it)"},
    {"rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
     "message": "metadata.name: a DNS label (lower-case letters, digits and '-')"},
]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].split("/")[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _structural(node: dict[str, Any], *, defaults: bool) -> dict[str, Any]:
    """One pydantic JSON Schema node -> a structural OpenAPI v3 node (with the models'
    defaults when `defaults`: the spec has them, the status must not, or the server would
    refill what a status patch removes)."""
    variants = node.get("anyOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express union {variants} structurally")
        inner = _structural({**non_null[0], **{k: v for k, v in node.items()
                                                if k != "anyOf"}}, defaults=defaults)
        if len(non_null) < len(variants):
            inner["nullable"] = True
        return inner
    out: dict[str, Any] = {k: node[k] for k in _KEEP if k in node}
    if defaults and node.get("default") is not None:  # applied by the API server
        out["default"] = node["default"]
        if node["default"] != {} and "description" in out:  # `kubectl explain` shows this
            out["description"] = f"{out['description']} Default: {_shown(node['default'])}."
    if out.get("maximum") == INT64_MAX:  # as a float64 bound it would round past int64:
        del out["maximum"]  # the API server refuses such a schema; int64 says the same
        out["format"] = "int64"
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "string"
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _structural(v, defaults=defaults) for k, v in props.items()}
            required = [r for r in node.get("required", []) if r in props]
            if required:
                out["required"] = required
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defaults=defaults)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["type"] = "array"
        out["items"] = _structural(node.get("items", {}), defaults=defaults)
    elif kind in ("string", "integer", "number", "boolean"):
        out["type"] = kind
    elif kind is None:
        out["x-kubernetes-preserve-unknown-fields"] = True
    else:
        raise ValueError(f"unsupported schema type {kind!r}")
    return out


def model_schema(model: type, *, defaults: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_inline(raw, raw.get("$defs", {})), defaults=defaults)


def build_crd() -> dict[str, Any]:
    spec_schema = model_schema(MeritRunSpec)
    status_schema = model_schema(MeritRunStatus, defaults=False)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(),
                      "listKind": f"{KIND}List", "shortNames": [SHORT_NAME]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Partitions", "type": "string", "jsonPath": ".status.progress",
                     "description": "Partitions done/total"},
                    {"name": "Strategy", "type": "string",
                     "jsonPath": ".spec.partitioning.strategy", "priority": 1},
                    {"name": "Model", "type": "string", "jsonPath": ".status.modelUri",
                     "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "MeritRun: split a mixture by gradient conflict, train the "
                                   "partitions in isolation, merge them once.",
                    "required": ["spec"],
                    "x-kubernetes-validations": _NAME_RULES,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }


def render_crd_yaml() -> str:
    import yaml

    header = "# Generated by `meritrun crd` from meritrun.api; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
