"""The storage server's IAM API as a grant issuer (SeaweedFS's embedded IAM, AWS IAM), and the
choice of issuer from the hub's environment.

`IamIssuer` issues and revokes the identities `meritrun.access` scopes: a user with an inline
prefix-scoped policy and an expiring service-account key. SigV4 signing is here because only
this client needs it. Never logs a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import urlencode, urlsplit

from pydantic import SecretStr

from .access import POLICY_NAME, GrantIssuer, GrantScope, scope_policy
from .assignment import SiteCredentials
from .conditions import to_rfc3339
from .errors import StorageError, TransientError
from .storage import Storage

log = logging.getLogger(__name__)
IAM_VERSION = "2010-05-08"
IAM_ENDPOINT_ENV = "MERITRUN_IAM_ENDPOINT"
ISSUER_ENV = "MERITRUN_GRANT_ISSUER"  # "minio", or unset for the IAM query API


def sigv4_headers(*, url: str, body: bytes, access_key: str, secret_key: str, region: str,
                  service: str, now: datetime) -> dict[str, str]:
    """AWS Signature V4 headers of a form POST (the IAM/STS query APIs)."""
    parts, stamp = urlsplit(url), now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8",
               "host": parts.netloc, "x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
               "x-amz-date": stamp}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(["POST", parts.path or "/", parts.query,
                           *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed,
                           headers["x-amz-content-sha256"]])
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


class IamIssuer:
    """Grants through the AWS IAM query API of the storage server (SeaweedFS's embedded IAM).

    issue: CreateUser (kept if it exists), PutUserPolicy (the scope), CreateServiceAccount
    with an Expiration the server enforces. revoke: delete its service accounts, policy and
    user (a missing one is fine). Needs the hub's admin key; never logs a secret.
    """

    def __init__(self, endpoint: str, *, access_key: str, secret_key: str,
                 region: str = "us-east-1", timeout_s: float = 30.0) -> None:
        import urllib3

        self.endpoint, self.region = endpoint.rstrip("/"), region
        self._keys = (access_key, SecretStr(secret_key))
        self._http = urllib3.PoolManager(timeout=timeout_s, retries=False)

    def __repr__(self) -> str:
        return f"IamIssuer({self.endpoint!r})"

    def _call(self, action: str, *, ok_codes: frozenset[str] = frozenset(),
              **params: str) -> ET.Element | None:
        import urllib3

        body = urlencode({"Action": action, "Version": IAM_VERSION, **params}).encode()
        url = self.endpoint + "/"
        headers = sigv4_headers(url=url, body=body, access_key=self._keys[0],
                                secret_key=self._keys[1].get_secret_value(),
                                region=self.region, service="iam",
                                now=datetime.now(timezone.utc))
        try:
            resp = self._http.request("POST", url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"IAM {action} at {self.endpoint}: {type(e).__name__}") from e
        try:
            root = ET.fromstring(resp.data) if resp.data else ET.Element("empty")
        except ET.ParseError:  # a proxy's HTML error page: the status code has to do
            root = ET.Element("unparsable")
        if resp.status == 200:
            return root
        code = root.findtext(".//{*}Code") or str(resp.status)
        if code in ok_codes:
            return None
        message = (root.findtext(".//{*}Message") or "")[:300]
        error = TransientError if resp.status >= 500 else StorageError
        raise error(f"IAM {action} at {self.endpoint} refused: {code}: {message}")

    def _delete_keys(self, identity: str) -> None:
        gone = frozenset({"NoSuchEntity"})
        listed = self._call("ListServiceAccounts", ParentUser=identity, ok_codes=gone)
        for sa in [] if listed is None else listed.iterfind(".//{*}ServiceAccountId"):
            self._call("DeleteServiceAccount", ServiceAccountId=sa.text or "", ok_codes=gone)

    def issue(self, identity: str, scope: GrantScope, *, expires: datetime) -> SiteCredentials:
        """A new key for the identity; keys issued to it before stop working (rotation)."""
        self._call("CreateUser", UserName=identity, ok_codes=frozenset({"EntityAlreadyExists"}))
        self._delete_keys(identity)
        self._call("PutUserPolicy", UserName=identity, PolicyName=POLICY_NAME,
                   PolicyDocument=json.dumps(scope_policy(scope)))
        root = self._call("CreateServiceAccount", ParentUser=identity,
                          Expiration=str(int(expires.timestamp())),
                          Description="meritrun site grant")
        assert root is not None
        key_id, secret = root.findtext(".//{*}AccessKeyId"), root.findtext(".//{*}SecretAccessKey")
        if not key_id or not secret:
            raise StorageError(f"IAM CreateServiceAccount at {self.endpoint} returned no key")
        log.info("granted %s until %s (write %s/%s)", identity, to_rfc3339(expires), *scope.write)
        return SiteCredentials(access_key_id=key_id, secret_access_key=SecretStr(secret))

    def revoke(self, identity: str) -> None:
        gone = frozenset({"NoSuchEntity"})
        self._delete_keys(identity)
        self._call("DeleteUserPolicy", UserName=identity, PolicyName=POLICY_NAME, ok_codes=gone)
        self._call("DeleteUser", UserName=identity, ok_codes=gone)
        log.info("revoked %s", identity)


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
