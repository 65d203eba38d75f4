"""Carrying out the pipeline's OfferAssignment / RevokeGrant actions, for both backends.

The decision is pure (`meritrun.pipeline.pull`); this is its I/O: write the assignment, issue
the scoped storage identity (`access.offer_assignment`), and keep the site's bundle where the
hub's admin picks it up: a Kubernetes Secret for the operator, a 0600 file for a local run.
Offers are repeated every round while a partition waits, so `offer` is a no-op when the
bundle of that attempt is already kept: one identity and key per attempt, not per round.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from .access import GrantIssuer, IamIssuer, grant_identity, offer_assignment
from .assignment import SiteGrant, parse_grant
from .pipeline.actions import GrantRef, OfferAssignment, RevokeGrant, grant_name
from .storage import Storage

log = logging.getLogger(__name__)
IAM_ENDPOINT_ENV = "MERITRUN_IAM_ENDPOINT"
ISSUER_ENV = "MERITRUN_GRANT_ISSUER"  # "minio", or unset for the IAM query API


class GrantStore(Protocol):
    """Where a site's bundle (with its secret) is kept for the hub's admin to hand over."""

    def attempt(self, name: str) -> int | None: ...
    def put(self, name: str, grant: SiteGrant) -> None: ...
    def delete(self, name: str, *, attempt: int) -> None: ...


class FileGrantStore:
    """Local runs: WORKDIR/grants/<name>.json, readable by the owner only."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def attempt(self, name: str) -> int | None:
        try:
            return parse_grant(self.path(name).read_text()).attempt
        except (OSError, ValueError):
            return None

    def put(self, name: str, grant: SiteGrant) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path(name).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(grant.bundle_json())
        tmp.replace(self.path(name))

    def delete(self, name: str, *, attempt: int) -> None:
        if self.attempt(name) == attempt:
            self.path(name).unlink(missing_ok=True)


def issuer_from_env(storage: Storage, *, endpoint: str | None, region: str | None,
                    env: Mapping[str, str] = os.environ) -> GrantIssuer | None:
    """The storage server's IAM API with the hub's own keys; None for a file:// root."""
    if not storage.root_uri.startswith("s3://"):
        return None
    iam = env.get(IAM_ENDPOINT_ENV) or endpoint
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not iam or not key or not secret:
        return None  # offer_assignment then says an s3:// run needs an issuer
    if env.get(ISSUER_ENV) == "minio":  # MinIO: its admin API, not an AWS-style IAM API
        from .minio_issuer import MinioIssuer
        return MinioIssuer(iam, access_key=key, secret_key=secret, region=region or "")
    return IamIssuer(iam, access_key=key, secret_key=secret, region=region or "us-east-1")


class GrantKeeper:
    def __init__(self, storage: Storage, issuer: GrantIssuer | None, store: GrantStore, *,
                 endpoint: str | None = None) -> None:
        self.storage, self.issuer, self.store, self.endpoint = storage, issuer, store, endpoint

    def offer(self, action: OfferAssignment) -> bool:
        """Write the assignment and keep a new grant, unless this attempt's is kept; True if new."""
        a = action.assignment
        held = self.store.attempt(action.grant)
        if held == a.attempt:
            return False
        if held is not None and self.issuer is not None:
            # The bundle of an older attempt is about to be replaced: its identity must not
            # outlive the only record of it.
            self.issuer.revoke(grant_identity(GrantRef(a.run, a.site, a.name, held)))
        grant = offer_assignment(a, storage=self.storage, issuer=self.issuer,
                                 expires=action.expires, endpoint=self.endpoint)
        self.store.put(action.grant, grant)
        log.info("grant %s: %s", action.grant, json.dumps(grant.public_view(), sort_keys=True))
        return True

    def held(self, run: str, candidates: Iterable[tuple[str, str]]) -> dict[str, GrantRef]:
        """The grants of (site, name) candidates the store still keeps: what `decide` sees."""
        out: dict[str, GrantRef] = {}
        for site, name in candidates:
            grant = grant_name(run, name, site)
            attempt = self.store.attempt(grant)
            if attempt is not None:
                out[grant] = GrantRef(run, site, name, attempt)
        return out

    def revoke(self, action: RevokeGrant) -> None:
        """Identity first, then the stored bundle: a failed revocation leaves the bundle, so
        the grant is still observed and the next round revokes it again."""
        ref = action.ref
        if self.issuer is not None:
            self.issuer.revoke(grant_identity(ref))
        self.store.delete(action.grant, attempt=ref.attempt)
        log.info("grant %s (attempt %d) revoked", action.grant, ref.attempt)
