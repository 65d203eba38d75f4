"""A small synchronous Kubernetes REST client: the operator's own hands on the API.

Why not the official client: its generated models re-validate every body, and it reads
`$KUBECONFIG` at import time. The operator needs a handful of verbs on plain dicts (the
manifests are dicts already), one configuration shared with kopf's login, and the same code
for remote clusters whose kubeconfig arrives in a Secret. Auth: bearer tokens (a token file
is re-read, so rotated service-account tokens keep working) and client certificates; exec
plugins are not supported (use a service-account token kubeconfig for remote sites).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

from meritrun.errors import MeritRunError, TransientError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0


class ApiError(MeritRunError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message[:300]}")
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class ApiConfig:
    """Where the API server is and how to authenticate (never logged: it holds secrets)."""

    server: str
    token: str | None = None
    token_path: str | None = None
    ca_pem: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    insecure: bool = False
    namespace: str | None = None

    def __repr__(self) -> str:
        return f"ApiConfig(server={self.server!r}, namespace={self.namespace!r})"

    @classmethod
    def in_cluster(cls) -> ApiConfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
            "KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SA_DIR / "token").exists():
            raise MeritRunError("not running in a cluster: set MERITRUN_KUBECONFIG")
        ns_file = SA_DIR / "namespace"
        host = f"[{host}]" if ":" in host else host
        return cls(server=f"https://{host}:{port}", token_path=str(SA_DIR / "token"),
                   ca_pem=(SA_DIR / "ca.crt").read_text(),
                   namespace=ns_file.read_text().strip() if ns_file.exists() else None)

    @classmethod
    def from_kubeconfig(cls, source: str | Path | dict, *, context: str | None = None) -> ApiConfig:
        """A kubeconfig file (path) or its parsed content (dict), current or named context."""
        doc = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
        base = Path(source).parent if not isinstance(source, dict) else Path(".")
        name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", name, "context")
        cluster = _named(doc, "clusters", ctx.get("cluster"), "cluster")
        user = _named(doc, "users", ctx.get("user"), "user") if ctx.get("user") else {}
        if "exec" in user or "auth-provider" in user:
            raise MeritRunError("kubeconfig users with exec/auth-provider are not supported; "
                                "use a token or a client certificate")
        return cls(
            server=cluster["server"].rstrip("/"),
            token=user.get("token"),
            token_path=_path(base, user.get("tokenFile")),
            ca_pem=_pem(base, cluster, "certificate-authority"),
            cert_pem=_pem(base, user, "client-certificate"),
            key_pem=_pem(base, user, "client-key"),
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            namespace=ctx.get("namespace"),
        )


def _named(doc: dict, section: str, name: str | None, key: str) -> dict:
    for item in doc.get(section) or []:
        if item.get("name") == name:
            return item.get(key) or {}
    raise MeritRunError(f"kubeconfig has no {section} entry named {name!r}")


def _path(base: Path, value: str | None) -> str | None:
    return None if not value else str(base / value)


def _pem(base: Path, section: dict, field: str) -> str | None:
    if section.get(f"{field}-data"):
        return base64.b64decode(section[f"{field}-data"]).decode()
    if section.get(field):
        return (base / section[field]).read_text()
    return None


class KubeApi:
    """Blocking JSON calls; thread-safe (one urllib3 pool shared by the worker threads)."""

    def __init__(self, config: ApiConfig, *, timeout_seconds: float = 30.0,
                 pool_size: int = 8, token_reread_seconds: float = TOKEN_REREAD_SECONDS) -> None:
        self.config = config
        self.token_reread_seconds = token_reread_seconds
        kwargs: dict[str, Any] = {"maxsize": pool_size, "retries": False,
                                  "timeout": urllib3.Timeout(total=timeout_seconds)}
        if config.server.startswith("https"):
            if config.insecure:
                kwargs["cert_reqs"] = "CERT_NONE"
            elif config.ca_pem:
                kwargs["ca_cert_data"] = config.ca_pem
            if config.cert_pem and config.key_pem:
                self._tmp = tempfile.TemporaryDirectory(prefix="meritrun-tls-")
                kwargs["cert_file"] = _secret_file(self._tmp.name, "tls.crt", config.cert_pem)
                kwargs["key_file"] = _secret_file(self._tmp.name, "tls.key", config.key_pem)
        self._http = urllib3.PoolManager(**kwargs)
        self._token, self._token_read = config.token, 0.0

    def _bearer(self) -> str | None:
        path = self.config.token_path
        if path and time.monotonic() - self._token_read > self.token_reread_seconds:
            self._token, self._token_read = Path(path).read_text().strip(), time.monotonic()
        return self._token

    def request(self, method: str, path: str, *, body: Any = None,
                query: dict[str, str] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        url = self.config.server + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": "meritrun-operator"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), content_type
        try:
            resp = self._http.request(method, url, body=data, headers=headers)
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"{method} {path}: {type(e).__name__}: {str(e)[:200]}") from e
        payload = _decode(resp.data)
        if resp.status >= 400:
            reason = payload.get("reason") or resp.reason or ""
            error = ApiError(resp.status, reason, payload.get("message") or "")
            if resp.status >= 500 or resp.status == 429:
                raise TransientError(str(error)) from error
            raise error
        return payload

    def watch(self, path: str, *, query: dict[str, str],
              timeout_seconds: int) -> Iterator[dict[str, Any]]:
        """Watch events ({type, object}) of one watch call; ends when the server closes it."""
        url = self.config.server + path + "?" + urlencode(
            {**query, "watch": "true", "timeoutSeconds": str(timeout_seconds)})
        headers = {"Accept": "application/json", "User-Agent": "meritrun-operator"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            resp = self._http.request(
                "GET", url, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=10.0, read=timeout_seconds + 30.0))
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"watch {path}: {type(e).__name__}: {str(e)[:200]}") from e
        try:
            if resp.status >= 400:
                payload = _decode(resp.read())
                raise ApiError(resp.status, payload.get("reason") or "",
                               payload.get("message") or "")
            pending = b""
            for chunk in resp.stream(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        except (urllib3.exceptions.HTTPError, ValueError) as e:
            raise TransientError(f"watch {path}: {type(e).__name__}: {str(e)[:200]}") from e
        finally:
            resp.release_conn()

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def list(self, path: str, *, labels: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": labels} if labels else None
        return list(self.request("GET", path, query=query).get("items") or [])

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=body,
                            content_type="application/merge-patch+json")

    def delete(self, path: str, *, propagation: str | None = None) -> dict[str, Any]:
        body = {"propagationPolicy": propagation} if propagation else None
        return self.request("DELETE", path, body=body)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {"message": raw[:300].decode(errors="replace")}
    return value if isinstance(value, dict) else {"message": str(value)[:300]}


def _secret_file(folder: str, name: str, content: str) -> str:
    path = Path(folder) / name
    path.touch(mode=0o600)
    path.write_text(content)
    return str(path)
