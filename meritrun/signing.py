"""Ed25519 signatures on partition manifests: who vouches for a contribution from a site.

A pull-mode site trains on machines the hub does not control. The manifest already pins every
file by sha256, so one signature over the manifest vouches for the whole artifact. A site
registers its public key (`spec.sites[].publicKey`: base64 of the raw 32-byte key); the merge
refuses a manifest whose signature is missing or wrong with check `signature`.

What is signed: a fixed domain tag, then the manifest without its `signature` field as
canonical JSON (keys sorted at every level, no whitespace, UTF-8, null fields dropped), so the bytes
do not depend on field order, indentation or a JSON round trip. `run`, `partition` and
`attempt` are inside, so a signature cannot be replayed for another partition or attempt as
long as the verifier checks those fields against what it expects.

`cryptography` is imported inside the functions: the core stays importable without it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING

from .artifacts import PartitionManifest
from .errors import ContributionRejected, SpecError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

CHECK = "signature"
DOMAIN = b"meritrun.partition-manifest/v1\n"  # signatures of anything else never verify here
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def canonical_manifest_bytes(manifest: PartitionManifest) -> bytes:
    """The exact bytes a manifest signature covers (everything except `signature`)."""
    body = manifest.model_dump(mode="json", exclude={"signature"}, exclude_none=True)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return DOMAIN + text.encode("utf-8")


def _b64decode(text: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64") from e


def load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    """A registered key (base64 of the raw 32 bytes); a malformed one is a SpecError."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    where = "spec.sites[].publicKey"
    try:
        raw = _b64decode(public_key_b64, what="the public key")
    except ValueError as e:
        raise SpecError(str(e), path=where) from e
    if len(raw) != KEY_BYTES:
        raise SpecError(f"an ed25519 public key has {KEY_BYTES} bytes, got {len(raw)}",
                        path=where)
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """base64 of the raw 32-byte public key: what spec.sites[].publicKey holds."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def sign_manifest(manifest: PartitionManifest, private_key: Ed25519PrivateKey | bytes
                  ) -> PartitionManifest:
    """A copy of the manifest carrying an ed25519 signature (base64) of its canonical bytes.

    `private_key` is a cryptography Ed25519PrivateKey or its raw 32-byte seed (see
    meritrun.keys to generate and load key files). An existing signature is replaced.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(private_key, bytes | bytearray):
        if len(private_key) != KEY_BYTES:
            raise ValueError(f"a raw ed25519 private key has {KEY_BYTES} bytes")
        private_key = Ed25519PrivateKey.from_private_bytes(bytes(private_key))
    signature = private_key.sign(canonical_manifest_bytes(manifest))
    return manifest.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_manifest_signature(manifest: PartitionManifest, public_key_b64: str) -> None:
    """Return if the manifest is signed by the key; else ContributionRejected(check=signature).

    Called by the merge's verification for partitions of sites with a registered key. A
    malformed registered key is the spec's fault, not the contribution's: SpecError.
    """
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key_b64)

    def refuse(detail: str) -> ContributionRejected:
        return ContributionRejected(manifest.partition, CHECK, detail)

    site = f"site {manifest.site!r}" if manifest.site else "its site"
    if not manifest.signature:
        raise refuse(f"the manifest is not signed, but {site} has a registered public key")
    try:
        signature = _b64decode(manifest.signature, what="the signature")
    except ValueError as e:
        raise refuse(str(e)) from e
    if len(signature) != SIGNATURE_BYTES:
        raise refuse(f"an ed25519 signature has {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        key.verify(signature, canonical_manifest_bytes(manifest))
    except InvalidSignature as e:
        raise refuse(f"the signature does not match the manifest and the public key registered "
                     f"for {site} (tampered manifest or another key)") from e
