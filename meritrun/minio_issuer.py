"""Site grants on MinIO: one expiring, prefix-scoped service account per grant.

The same grant as `access.IamIssuer` (docs/sites.md, "Scoped access"), through MinIO's admin
API (`minio.MinioAdmin`) instead of an AWS-style IAM query API, which MinIO does not serve.
A grant is a service account of the hub's own (admin) user with:
- an inline policy, `access.scope_policy(scope)`: a service account's rights are its parent's
  narrowed to that policy, so the site reads its inputs and writes only its attempt's prefix;
- an expiration MinIO enforces (requests signed with the key fail after it), within MinIO's
  bounds of 15 minutes to 365 days (`minio_expiration`);
- a deterministic access key derived from the grant's identity, so the hub revokes (deletes the
  account) knowing only the grant's identity, and a re-issue for the same attempt replaces the
  old key (rotation: the old bundle stops working).

Chosen with `MERITRUN_GRANT_ISSUER=minio` (iam.issuer_from_env). The secret is generated
here, returned once as a SecretStr, and never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from pydantic import SecretStr

from .access import GrantScope, scope_policy
from .assignment import SiteCredentials
from .errors import StorageError, TransientError

log = logging.getLogger(__name__)
KEY_PREFIX = "mrg"  # MinIO access keys: 3 to 20 characters
KEY_LENGTH = 20
SECRET_LENGTH = 40
MIN_EXPIRY, MAX_EXPIRY = timedelta(minutes=15), timedelta(days=365)  # MinIO's own bounds
EXPIRY_MARGIN = timedelta(seconds=30)  # the request's own transit and clock skew


def service_account_key(identity: str) -> str:
    """The grant's access key: a stable digest of its identity, 20 characters, [a-z0-9]."""
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return KEY_PREFIX + digest[:KEY_LENGTH - len(KEY_PREFIX)]


def minio_expiration(expires: datetime, *, now: datetime) -> str:
    """The expiration as MinIO's admin API takes it (RFC 3339, UTC), within MinIO's bounds.

    MinIO refuses a service-account expiration under 15 minutes or over 365 days from now.
    A grant meant to end sooner lives 15 minutes (and a margin) on MinIO; the hub revokes it
    at its deadline anyway (the pipeline's RevokeGrant), so the deadline still holds.
    """
    lowest, highest = now + MIN_EXPIRY + EXPIRY_MARGIN, now + MAX_EXPIRY - EXPIRY_MARGIN
    clamped = min(max(expires, lowest), highest)
    return clamped.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MinioIssuer:
    """Issue and revoke grants through MinIO's admin API with the hub's admin key."""

    def __init__(self, endpoint: str, *, access_key: str, secret_key: str,
                 region: str = "", timeout_s: float = 30.0) -> None:
        import urllib3
        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        http = urllib3.PoolManager(timeout=urllib3.Timeout(total=timeout_s),
                                   retries=urllib3.Retry(total=2, backoff_factor=0.2))
        self._admin = MinioAdmin(endpoint=parts.netloc, region=region,
                                 credentials=StaticProvider(access_key, secret_key),
                                 secure=parts.scheme == "https", http_client=http)

    def __repr__(self) -> str:
        return f"MinioIssuer({self.endpoint!r})"

    def _call(self, what: str, fn, *, missing_ok: bool = False, **kwargs) -> str:  # noqa: ANN001
        import urllib3
        from minio.error import MinioAdminException

        try:
            return fn(**kwargs)
        except MinioAdminException as e:
            code, body = str(getattr(e, "_code", "")), str(getattr(e, "_body", ""))
            if missing_ok and (code == "404" or "NotFound" in body or "not exist" in body):
                return ""
            error = TransientError if code.startswith("5") else StorageError
            raise error(f"MinIO admin {what} at {self.endpoint} refused: {code}: "
                        f"{_message(body)}") from e
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"MinIO admin {what} at {self.endpoint}: "
                                 f"{type(e).__name__}") from e

    def issue(self, identity: str, scope: GrantScope, *, expires: datetime) -> SiteCredentials:
        """A new key for the grant; a key issued before under this identity stops working."""
        key = service_account_key(identity)
        self._call("delete service account", self._admin.delete_service_account,
                   missing_ok=True, access_key=key)
        secret = secrets.token_urlsafe(SECRET_LENGTH)[:SECRET_LENGTH]
        until = minio_expiration(expires, now=datetime.now(timezone.utc))
        self._call("add service account", self._admin.add_service_account,
                   access_key=key, secret_key=secret, description=identity[:256],
                   policy=scope_policy(scope), expiration=until)
        log.info("granted %s as %s until %s (write %s/%s)", identity, key, until,
                 *scope.write)
        return SiteCredentials(access_key_id=key, secret_access_key=SecretStr(secret))

    def revoke(self, identity: str) -> None:
        """Delete the grant's service account (a missing one is fine): its key stops working."""
        self._call("delete service account", self._admin.delete_service_account,
                   missing_ok=True, access_key=service_account_key(identity))
        log.info("revoked %s", identity)


def _message(body: str) -> str:
    """MinIO's JSON error message, cut to 300 characters."""
    try:
        return str(json.loads(body).get("Message") or body)[:300]
    except (ValueError, AttributeError):
        return body[:300]
