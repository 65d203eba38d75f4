"""Pull sites' grants as Secrets: the hub's admin hands `<run>-<partition>-grant` to the site.

The bundle holds the site's scoped storage key, so it lives only in a Secret of the run's
namespace (owned by the run: deleting the run deletes it), never in the status, an event or
a log line. The attempt it was issued for is an annotation, so a repeated offer is one GET.
Needs `get/create/patch/delete secrets`; the chart grants them only with `pullSites.enabled`.
"""

from __future__ import annotations

import base64
import logging

from meritrun import API_GROUP
from meritrun.assignment import SiteGrant

from .kubeapi import ApiError, KubeApi
from .manifests import (
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_RUN_UID,
    MANAGED_BY,
    RunRef,
    owner_reference,
)

log = logging.getLogger(__name__)
GRANT_KEY = "grant.json"
ANNOTATION_ATTEMPT = f"{API_GROUP}/grant-attempt"
LABEL_SITE = f"{API_GROUP}/site"


def grant_secret(name: str, grant: SiteGrant, *, run: RunRef) -> dict:
    """The Secret holding a site's bundle (pure: tested without an API)."""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": name, "namespace": run.namespace,
            "labels": {LABEL_RUN: run.name, LABEL_RUN_UID: run.uid, LABEL_SITE: grant.site,
                       LABEL_MANAGED_BY: MANAGED_BY},
            "annotations": {ANNOTATION_ATTEMPT: str(grant.attempt)},
            "ownerReferences": [owner_reference(run)],
        },
        "data": {GRANT_KEY: base64.b64encode(grant.bundle_json().encode()).decode()},
    }


class SecretGrantStore:
    def __init__(self, api: KubeApi, run: RunRef) -> None:
        self.api, self.run = api, run

    def _path(self, name: str | None = None) -> str:
        path = f"/api/v1/namespaces/{self.run.namespace}/secrets"
        return f"{path}/{name}" if name else path

    def attempt(self, name: str) -> int | None:
        try:
            secret = self.api.get(self._path(name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        meta = secret.get("metadata") or {}
        if (meta.get("labels") or {}).get(LABEL_RUN_UID) != self.run.uid:
            return None  # left by an earlier run with the same name: replaced by put
        try:
            return int((meta.get("annotations") or {}).get(ANNOTATION_ATTEMPT, ""))
        except ValueError:
            return None

    def put(self, name: str, grant: SiteGrant) -> None:
        body = grant_secret(name, grant, run=self.run)
        try:
            self.api.create(self._path(), body)
        except ApiError as e:
            if e.status != 409:
                raise
            self.api.merge_patch(self._path(name), {"metadata": body["metadata"],
                                                    "data": body["data"]})
        log.info("run %s/%s: grant for site %s (attempt %d) in Secret %s", self.run.namespace,
                 self.run.name, grant.site, grant.attempt, name)

    def delete(self, name: str, *, attempt: int) -> None:
        if self.attempt(name) != attempt:
            return
        try:
            self.api.delete(self._path(name))
        except ApiError as e:
            if e.status != 404:
                raise
