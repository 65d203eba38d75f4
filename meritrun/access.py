"""Scoped site access: the hub grants a pull site storage rights for one attempt, and no more.

A grant lets a site read its assignment (and the base model) and write only under its output
prefix for the current attempt (`runs/<run>/partitions/<p>/attempt-<n>/`) until it expires or
is revoked. Mechanism (why: docs/sites.md): one storage identity per grant with an inline
prefix-scoped policy and an expiring service-account key, created through the storage server's
IAM API (`IamIssuer`; SeaweedFS: `-s3.iam.readOnly=false`). The site then uses plain S3 calls,
so multipart uploads of multi-GB shards and file-level resume work unchanged.

Pure parts first (scope, policy, names, SigV4), then the I/O. The secret key is a SecretStr:
never in a repr, log line, event or the status. `SiteGrant.public_view()` may be shown;
`SiteGrant.bundle_json()` (with the secret) goes only into a Kubernetes Secret or to the site.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

from pydantic import SecretStr

from .api import MeritRunSpec, PartitionStatus
from .artifacts import RunId
from .assignment import (
    Assignment,
    SiteCredentials,
    SiteGrant,
    build_train_assignment,
    read_assignment,
    write_assignment,
)
from .conditions import from_rfc3339, to_rfc3339
from .errors import SpecError, StorageError, TransientError
from .pipeline.actions import GrantRef
from .pipeline.pull import grant_expiry
from .storage import Storage, open_storage, split_uri

log = logging.getLogger(__name__)

POLICY_NAME = "meritrun-grant"
IAM_VERSION = "2010-05-08"
_IDENTITY = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,64}$")  # AWS IAM user-name rules
# PutObject covers every step of a multipart upload; Abort is its own action on AWS and MinIO.
WRITE_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")

# --- pure: what a grant allows -------------------------------------------------------------


@dataclass(frozen=True)
class GrantScope:
    """Object-key prefixes (bucket, full key) a site may read, and the one it may write."""

    read: tuple[tuple[str, str], ...]
    write: tuple[str, str]


def _full(root_uri: str, key: str) -> tuple[str, str]:
    bucket_root, root_key = split_uri(root_uri)
    if not bucket_root.startswith("s3://"):
        raise SpecError(f"{root_uri}: scoped grants need s3:// storage", path="spec.storage")
    return bucket_root.removeprefix("s3://"), "/".join(p for p in (root_key, key) if p)


def grant_scope(assignment: Assignment, *, root_uri: str) -> GrantScope:
    """Read: the assignment's folder and (if in S3) the base model; write: the output."""
    read = [_full(root_uri, assignment.key.rsplit("/", 1)[0])]
    if assignment.base_model.startswith("s3://"):
        bucket, key = split_uri(assignment.base_model)
        read.append((bucket.removeprefix("s3://"), key))
    return GrantScope(read=tuple(read), write=_full(root_uri, assignment.output))


def scope_policy(scope: GrantScope) -> dict:
    """The IAM policy document of a scope (standard AWS grammar, under 2 KiB)."""
    def arns(bucket: str, key: str) -> list[str]:
        return [f"arn:aws:s3:::{bucket}/{key}", f"arn:aws:s3:::{bucket}/{key}/*"]

    listed: dict[str, list[str]] = {}
    for bucket, key in (*scope.read, scope.write):
        listed.setdefault(bucket, []).extend([key, f"{key}/*"])
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadInputs", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [a for b, k in scope.read for a in arns(b, k)]},
        {"Sid": "WriteOutput", "Effect": "Allow", "Action": list(WRITE_ACTIONS),
         "Resource": arns(*scope.write)},
        {"Sid": "Locate", "Effect": "Allow", "Action": ["s3:GetBucketLocation"],
         "Resource": [f"arn:aws:s3:::{b}" for b in listed]},
    ]
    statements += [
        {"Sid": f"List{i}", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"],
         "Condition": {"StringLike": {"s3:prefix": prefixes}}}
        for i, (bucket, prefixes) in enumerate(listed.items())
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def grant_identity(assignment: Assignment | GrantRef) -> str:
    """Deterministic identity name, so the hub can revoke a grant knowing only its attempt."""
    name = f"meritrun-{assignment.run}-{assignment.site}-{assignment.name}-a{assignment.attempt}"
    if not _IDENTITY.match(name):
        name = "meritrun-" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return name


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


# --- the site side --------------------------------------------------------------------


def open_as_site(grant: SiteGrant, root_uri: str | None = None) -> Storage:
    """Storage (the run's root, or another root such as the base model's) with the grant's key."""
    creds = grant.credentials
    return open_storage(
        root_uri or grant.storage_root, endpoint=grant.endpoint, region=grant.region,
        access_key=creds.access_key_id if creds else None,
        secret_key=creds.secret_access_key.get_secret_value() if creds else None)


def read_granted_assignment(grant: SiteGrant, *, now: datetime) -> tuple[Assignment, Storage]:
    """The assignment a grant points at, and the run's storage, both through the grant's key."""
    if grant.expired(now):
        raise SpecError(f"this grant expired at {grant.expires}; ask the hub for a new one",
                        path="--assignment")
    storage = open_as_site(grant)
    a = read_assignment(storage, grant.assignment_key)
    if ((a.run, a.run_uid, a.site, a.name, a.attempt)
            != (grant.run, grant.run_uid, grant.site, grant.name, grant.attempt)):
        raise SpecError(f"the assignment at {grant.assignment_key} is not the one the grant "
                        "names", path="--assignment")
    return a, storage


# --- the hub side: issuing and revoking ----------------------------------------------------


class GrantIssuer(Protocol):
    def issue(self, identity: str, scope: GrantScope, *,
              expires: datetime) -> SiteCredentials | None: ...

    def revoke(self, identity: str) -> None: ...


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


def offer_assignment(assignment: Assignment, *, storage: Storage, issuer: GrantIssuer | None,
                     expires: datetime, endpoint: str | None = None,
                     region: str | None = None) -> SiteGrant:
    """Write the assignment, issue its grant, return the site's bundle (it holds a secret).

    A file:// root gets a grant with no key (nothing can scope a shared folder): issuer None.
    """
    write_assignment(storage, assignment)
    identity, creds = grant_identity(assignment), None
    if storage.root_uri.startswith("s3://"):
        if issuer is None:
            raise SpecError("an s3:// run needs a grant issuer for pull sites", path="sites")
        scope = grant_scope(assignment, root_uri=storage.root_uri)
        creds = issuer.issue(identity, scope, expires=expires)
    return SiteGrant(
        run=assignment.run, run_uid=assignment.run_uid, site=assignment.site,
        name=assignment.name, attempt=assignment.attempt, storage_root=storage.root_uri,
        assignment_key=assignment.key, endpoint=endpoint or assignment.storage.endpoint,
        region=region or assignment.storage.region, identity=identity if creds else None,
        expires=to_rfc3339(expires), credentials=creds)


def offer_partition(run: RunId, spec: MeritRunSpec, part: PartitionStatus, *, storage: Storage,
                    issuer: GrantIssuer | None, now: datetime, endpoint: str | None = None
                    ) -> SiteGrant:
    """Assignment + grant of a waiting pull partition in one call, for tools and tests.

    The backends get the same from the pipeline's OfferAssignment (`pipeline.pull._offer`,
    carried out by `grants.GrantKeeper`): the same assignment, expiry and issuer call.
    """
    assignment = build_train_assignment(run, spec, part)
    start = from_rfc3339(part.start_time) if part.start_time else now
    return offer_assignment(assignment, storage=storage, issuer=issuer, endpoint=endpoint,
                            expires=grant_expiry(spec, assignment.site, start=start))
