"""A small blocking JSON client for the test control plane (the tests' own, not the operator's).

Paths are API paths (`/api/v1/namespaces/x/pods`); `resource_path` turns the short forms the
tests use ("batch/v1/jobs", "v1/configmaps", "merit.run/v1alpha1/meritruns") into them.
Errors raise `ApiStatus` with the server's code and reason. Thread-safe (one urllib3 pool).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import urllib3


class ApiStatus(Exception):
    """The API server answered with an error status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {code} {reason}: {message[:500]}")
        self.code, self.reason, self.message = code, reason, message


def resource_path(resource: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """"batch/v1/jobs" (group/version/plural, or version/plural for the core group) -> path."""
    parts = resource.strip("/").split("/")
    if len(parts) == 2:
        base = f"/api/{parts[0]}"
    elif len(parts) == 3:
        base = f"/apis/{parts[0]}/{parts[1]}"
    else:
        raise ValueError(f"resource {resource!r}: expected [group/]version/plural")
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{parts[-1]}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class Api:
    def __init__(self, server: str, *, token: str, ca_pem: str, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        ctx = ssl.create_default_context(cadata=ca_pem)
        self._http = urllib3.PoolManager(maxsize=8, ssl_context=ctx, retries=False,
                                         timeout=urllib3.Timeout(total=timeout))
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", params: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = urllib3.Timeout(total=timeout)
        r = self._http.request(method, self.server + path, body=data, headers=headers,
                               fields=params if params and body is None else None, **kwargs)
        text = r.data.decode(errors="replace")
        if r.status >= 400:
            try:
                status = json.loads(text)
                raise ApiStatus(r.status, status.get("reason", ""), status.get("message", text))
            except ValueError:
                raise ApiStatus(r.status, "", text) from None
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self.get(path)
        except ApiStatus as e:
            if e.code == 404:
                return None
            raise

    def list(self, path: str, *, labels: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.request("GET", path, params=params or None)["items"]

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, *, grace_seconds: int | None = None,
               missing_ok: bool = True) -> None:
        body = None
        if grace_seconds is not None:
            body = {"kind": "DeleteOptions", "apiVersion": "v1",
                    "gracePeriodSeconds": grace_seconds, "propagationPolicy": "Background"}
        try:
            self.request("DELETE", path, body)
        except ApiStatus as e:
            if not (missing_ok and e.code == 404):
                raise
