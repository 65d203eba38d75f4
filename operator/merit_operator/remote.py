"""API clients for other clusters (`sites[].mode: kubeconfig`), built from kubeconfig Secrets.

A kubeconfig site trains its partitions as Jobs on a cluster this operator can reach: the
Secret named by `sites[].secretRef` (in the run's namespace) holds a `kubeconfig` key. Jobs
there carry our labels but no owner reference (an owner uid from another cluster would make
that cluster's garbage collector delete them at once); the finalizer deletes them instead.
The storage Secret must exist under the same name in the remote namespace.

Reading these Secrets needs `get secrets`; the chart grants it only when `remoteSites.enabled`.
"""

from __future__ import annotations

import base64
import logging
import threading

import yaml

from meritrun.api import MeritRunSpec
from meritrun.errors import SpecError

from .kubeapi import ApiConfig, ApiError, KubeApi

log = logging.getLogger(__name__)
KUBECONFIG_KEY = "kubeconfig"


class RemoteClusters:
    """A cache of clients, keyed by Secret and its resourceVersion (a rotated Secret reloads)."""

    def __init__(self, local: KubeApi) -> None:
        self.local = local
        self._clients: dict[tuple[str, str, str], tuple[KubeApi, str]] = {}
        self._lock = threading.Lock()

    def client_for(self, namespace: str, spec: MeritRunSpec, site_name: str) -> tuple[KubeApi, str]:
        """(client, namespace on that cluster) for a kubeconfig site of the run."""
        site = spec.site(site_name)
        if site.mode != "kubeconfig" or site.secret_ref is None:
            raise SpecError(f"site {site_name!r} needs mode kubeconfig and a secretRef",
                            path="spec.sites")
        secret_name = site.secret_ref.name
        try:
            secret = self.local.get(f"/api/v1/namespaces/{namespace}/secrets/{secret_name}")
        except ApiError as e:
            raise SpecError(f"cannot read Secret {secret_name}: {e.reason}",
                            path="spec.sites.secretRef") from e
        key = (namespace, secret_name, secret["metadata"].get("resourceVersion", ""))
        with self._lock:
            if key not in self._clients:
                raw = (secret.get("data") or {}).get(KUBECONFIG_KEY)
                if not raw:
                    raise SpecError(f"Secret {secret_name} has no {KUBECONFIG_KEY!r} key",
                                    path="spec.sites.secretRef")
                config = ApiConfig.from_kubeconfig(yaml.safe_load(base64.b64decode(raw)))
                self._clients[key] = (KubeApi(config), config.namespace or namespace)
                log.info("site %s: client for %s", site_name, config.server)
            return self._clients[key]
