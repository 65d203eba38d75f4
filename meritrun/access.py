"""Scoped site access, in one place: what a grant allows, how it is offered, issued and revoked.

The backends only persist a grant's bundle (`GrantStore`: a Secret, or a 0600 file in
`meritrun.grants`) and talk to the storage server through an issuer (`meritrun.iam`: the
AWS-style IAM API, or `meritrun.minio_issuer`); the pipeline decides when to offer and revoke.


A grant lets a site read its assignment (and the base model) and write only under its output
prefix for the current attempt (`runs/<run>/<uid>/partitions/<p>/attempt-<n>/`) and its
partition's checkpoint prefix (`.../partitions/<p>/checkpoints/`, so a later attempt resumes),
until it expires or is revoked. Mechanism (why: docs/sites.md): one storage identity per
grant with an inline prefix-scoped policy and an expiring service-account key, created
through the storage server's IAM API (`meritrun.iam.IamIssuer`; SeaweedFS:
`-s3.iam.readOnly=false`). The site then uses plain S3 calls, so multipart uploads of
multi-GB shards and file-level resume work unchanged.

Pure parts first (scope, policy, names), then the I/O. The secret key is a SecretStr:
never in a repr, log line, event or the status. `SiteGrant.public_view()` may be shown;
`SiteGrant.bundle_json()` (with the secret) goes only into a Kubernetes Secret or to the site.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .api import MeritRunSpec, PartitionStatus
from .artifacts import RunId, checkpoint_prefix
from .assignment import (
    Assignment,
    SiteCredentials,
    SiteGrant,
    build_train_assignment,
    read_assignment,
    write_assignment,
)
from .conditions import from_rfc3339, to_rfc3339
from .errors import SpecError
from .pipeline.actions import GrantRef, OfferAssignment, RevokeGrant, grant_name
from .pipeline.pull import grant_expiry
from .storage import Storage, open_storage, split_uri

log = logging.getLogger(__name__)

POLICY_NAME = "meritrun-grant"
_IDENTITY = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,64}$")  # AWS IAM user-name rules
# PutObject covers every step of a multipart upload; Abort is its own action on AWS and MinIO.
WRITE_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")

# --- pure: what a grant allows -------------------------------------------------------------


@dataclass(frozen=True)
class GrantScope:
    """Object-key prefixes (bucket, full key) a site may read, the one it may write, and
    (a train grant) its partition's checkpoint prefix, which outlives the attempt: the next
    attempt's grant reads back and removes what this one wrote there."""

    read: tuple[tuple[str, str], ...]
    write: tuple[str, str]
    checkpoints: tuple[str, str] | None = None

    @property
    def writable(self) -> tuple[tuple[str, str], ...]:
        return (self.write,) if self.checkpoints is None else (self.write, self.checkpoints)


def _full(root_uri: str, key: str) -> tuple[str, str]:
    bucket_root, root_key = split_uri(root_uri)
    if not bucket_root.startswith("s3://"):
        raise SpecError(f"{root_uri}: scoped grants need s3:// storage", path="spec.storage")
    return bucket_root.removeprefix("s3://"), "/".join(p for p in (root_key, key) if p)


def grant_scope(assignment: Assignment, *, root_uri: str) -> GrantScope:
    """Read: the assignment's folder and (if in S3) the base model; write: the output and,
    for a train assignment, the partition's checkpoints (artifacts.checkpoint_prefix)."""
    read = [_full(root_uri, assignment.key.rsplit("/", 1)[0])]
    if assignment.base_model.startswith("s3://"):
        bucket, key = split_uri(assignment.base_model)
        read.append((bucket.removeprefix("s3://"), key))
    checkpoints = None
    if assignment.kind == "train" and assignment.partition:
        checkpoints = _full(root_uri, checkpoint_prefix(assignment.run_id, assignment.partition))
    return GrantScope(read=tuple(read), write=_full(root_uri, assignment.output),
                      checkpoints=checkpoints)


def scope_policy(scope: GrantScope) -> dict:
    """The IAM policy document of a scope (standard AWS grammar, under 2 KiB)."""
    def arns(bucket: str, key: str) -> list[str]:
        return [f"arn:aws:s3:::{bucket}/{key}", f"arn:aws:s3:::{bucket}/{key}/*"]

    listed: dict[str, list[str]] = {}
    for bucket, key in (*scope.read, *scope.writable):
        listed.setdefault(bucket, []).extend([key, f"{key}/*"])
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadInputs", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [a for b, k in scope.read for a in arns(b, k)]},
        {"Sid": "WriteOutput", "Effect": "Allow", "Action": list(WRITE_ACTIONS),
         "Resource": [a for b, k in scope.writable for a in arns(b, k)]},
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


# --- the hub side: the lifecycle the backends drive -----------------------------------------


class GrantStore(Protocol):
    """Where a site's bundle (with its secret) is kept for the hub's admin to hand over: a
    Kubernetes Secret (merit_operator.grants) or a 0600 file (meritrun.grants). Persistence
    only: what to issue and when to revoke is decided here and in the pipeline."""

    def attempt(self, name: str) -> int | None: ...
    def put(self, name: str, grant: SiteGrant) -> None: ...
    def delete(self, name: str, *, attempt: int) -> None: ...


class GrantKeeper:
    """Carries out the pipeline's OfferAssignment / RevokeGrant and reports the live grants.

    Offers repeat every round while a partition waits, so `offer` is a no-op when the bundle
    of that attempt is already kept: one identity and key per attempt, not per round."""

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
