"""kmock's KubernetesEmulator with what kopf, kubectl and our RBAC test need (see INFRA.md).

Added on top of kmock 0.8: uid/resourceVersion/creationTimestamp/generation on create (and
generateName), a resourceVersion bump on every write and a generation bump on spec changes,
`metadata.resourceVersion` preconditions (409 Conflict), JSON-patch `test` failures as 422,
the status subresource kept apart from the main resource, the namespaces list, `kind` and
`apiVersion` on lists, label selectors on lists, server-side Tables (printer columns from an
installed CRD, as `kubectl get` shows them), standard error reasons, bearer-token users, and
a log of every request (user, method, path) for the RBAC test.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts, enums
from kmock._internal.k8s import (
    KubernetesError,
    KubernetesNotFoundError,
    KubernetesObjectConflictError,
)

CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


@dataclass(frozen=True)
class Recorded:
    user: str
    method: str
    path: str
    query: dict[str, str]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    seconds = int((datetime.now(timezone.utc) - created).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def _jsonpath(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def matches_selector(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-joined."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    tokens: dict[str, str] = attrs.field(factory=dict)  # bearer token -> user name
    # Each user gets its own port: kubectl (client-go) sends no bearer token over plain HTTP,
    # so the port says who is calling, and a token, when sent, must agree with it.
    ports: dict[int, str] = attrs.field(factory=dict)
    recorded: list[Recorded] = attrs.field(factory=list)
    namespaces: set[str] = attrs.field(factory=lambda: {"default"})
    columns: dict[Any, list[dict]] = attrs.field(factory=dict)
    _rv: int = 100
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()

    # --- setup --------------------------------------------------------------------------

    def install_crd(self, crd: dict[str, Any]) -> None:
        """Serve a CRD's resource the way the API server does once the CRD is applied."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"], singular=names.get("singular"),
                namespaced=spec["scope"] == "Namespaced", verbs=ALL_VERBS,
                shortnames=set(names.get("shortNames", [])),
                subresources=set(version.get("subresources") or {}))
            self.columns[res] = version.get("additionalPrinterColumns") or []
        body = json.loads(json.dumps(crd))
        self._stamp(body)
        self.objects[CRD_RESOURCE, None, crd["metadata"]["name"]] = body

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _stamp(self, body: dict[str, Any], namespace: str | None = None) -> None:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5))
        if namespace:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self.next_rv(),
                    creationTimestamp=now_rfc3339(), generation=1)

    def _has_status(self, res: Any) -> bool:
        return res in self.resources and "status" in self.resources[res].subresources

    # --- the HTTP entry point -----------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        sock = raw.transport.get_extra_info("sockname") if raw.transport else None
        user = self.ports.get(sock[1] if sock else -1, "?")
        header = raw.headers.get("Authorization")
        self.recorded.append(Recorded(user, raw.method, raw.path, dict(raw.query)))
        if header is not None and self.tokens.get(header.removeprefix("Bearer ").strip()) != user:
            return aiohttp.web.json_response(
                _status(401, "Unauthorized", "bearer token does not match"), status=401)
        parts = raw.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return await self._serve_namespaces(raw, parts[3] if len(parts) == 4 else None)
        # kmock routes a request by scanning every request it ever served (O(n) each, O(n^2)
        # in all); we keep our own log in `recorded`, so its log holds only the current one.
        self._requests.clear()
        return await super().__call__(raw)

    async def _serve_namespaces(self, raw: aiohttp.web.BaseRequest,
                                name: str | None) -> aiohttp.web.StreamResponse:
        def ns(n: str) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": n, "uid": n, "resourceVersion": "1"},
                    "status": {"phase": "Active"}}

        if name is not None:
            if name not in self.namespaces:
                return aiohttp.web.json_response(_status(404, "NotFound", name), status=404)
            return aiohttp.web.json_response(ns(name))
        if raw.query.get("watch") not in ("true", "1"):
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": [ns(n) for n in sorted(self.namespaces)]})
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        if "resourceVersion" not in raw.query:  # a watch from a list's version sends no replay
            for n in sorted(self.namespaces):
                await response.write(json.dumps({"type": "ADDED", "object": ns(n)}).encode()
                                     + b"\n")
        await self._closing.wait()
        return response

    def close(self) -> None:
        self._closing.set()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.name is None and isinstance(
                request.data, dict) and request.action == enums.action.CREATE:
            self._stamp(request.data, request.namespace)
            if self._has_status(request.resource):
                request.data.pop("status", None)
        elif request.resource is not None and request.action == enums.action.UPDATE:
            request = self._prepare_patch(request)
        elif request.resource is not None and request.action == enums.action.DELETE:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                meta = self.objects[key].get("metadata", {})
                if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                    self.objects[key].patch({"metadata": {"resourceVersion": self.next_rv()}})
        return await super()._handle(request)

    def _prepare_patch(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return request  # kmock answers 404
        current = self.objects[key].raw
        on_status = request.subresource == "status"
        guarded = self._has_status(request.resource)
        data = request.data
        if isinstance(data, list):
            data = [op for op in data if op.get("op") == "test"
                    or (op.get("path", "").startswith("/status") == on_status or not guarded)]
            try:
                new = jsonpatch.apply_patch(current, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise KubernetesError(422, "Invalid", f"json patch: {e}") from e
        elif isinstance(data, dict):
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"].get("resourceVersion"):
                raise KubernetesError(409, "Conflict", "the object has been modified")
            if guarded:
                data = {k: v for k, v in data.items() if (k == "status") == on_status}
            new = dicts.patch_dict(current, data)
        else:
            return request
        meta = {"resourceVersion": self.next_rv()}
        if not on_status and new.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation") or 1) + 1
        # Rewritten in place: kmock's reactions match on the request object itself.
        if isinstance(data, list):
            request.data[:] = data + [{"op": "add", "path": f"/metadata/{k}", "value": v}
                                      for k, v in meta.items()]
        else:
            request.data.clear()
            request.data.update({**data, "metadata": {**(data.get("metadata") or {}), **meta}})
        return request

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        items = [o for o in result["items"] if not selector
                 or matches_selector((o.get("metadata") or {}).get("labels") or {}, selector)]
        res = request.resource
        info = self.resources[res] if res in self.resources else None
        kind = info.kind if info and info.kind else "Object"
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        if "as=Table" in accept and res in self.columns:
            return self._table(items, self.columns[res])
        return {"apiVersion": f"{res.group}/{res.version}".lstrip("/"), "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _table(self, items: list[dict], columns: list[dict]) -> dict[str, Any]:
        defs = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                 "description": "Name of the object"}]
        defs += [{"name": c["name"], "type": c["type"], "format": "",
                  "priority": c.get("priority", 0), "description": c.get("description", "")}
                 for c in columns]
        rows = []
        for obj in items:
            cells = [obj["metadata"]["name"]]
            for c in columns:
                value = _jsonpath(obj, c["jsonPath"])
                cells.append(age(value) if c["type"] == "date" else value)
            rows.append({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": defs, "rows": rows}

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, KubernetesObjectConflictError):
            return aiohttp.web.json_response(_status(409, "AlreadyExists", "already exists"),
                                             status=409)
        if isinstance(exc, KubernetesNotFoundError):
            return aiohttp.web.json_response(_status(404, "NotFound", exc.message), status=404)
        if isinstance(exc, KubernetesError):
            return aiohttp.web.json_response(
                _status(exc.status, exc.reason or "InternalError", exc.message or ""),
                status=exc.status)
        return await super()._render_error(exc)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message}
