"""Site signing keys: generate one, load one, and the `meritrun keygen` command.

A site keeps its ed25519 private key (PEM, PKCS#8, file mode 0600) and gives the hub only the
public key, as base64 of the raw 32 bytes, for `spec.sites[].publicKey`. Nothing here talks to
storage or the cluster. `cryptography` is imported inside the functions.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .clihelp import DefaultsHelpFormatter
from .errors import MeritRunError, SpecError
from .signing import KEY_BYTES, public_key_b64

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)


def generate_site_key(path: Path, *, overwrite: bool = False) -> str:
    """Write a new private key to `path` (0600); return its public key (base64)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    path = Path(path)
    if path.exists() and not overwrite:
        raise SpecError(f"{path} exists; refusing to replace a key (its public key may be "
                        "registered)", path="--out")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with 0600 from the start: the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a new file; --force replaces one
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_b64(key)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM (PKCS#8) file or a file holding base64 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read key {path}: {e.strerror}", path="--key") from e
    if b"-----BEGIN" in data:
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{path}: not an unencrypted PEM private key: {e}",
                            path="--key") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise SpecError(f"{path}: not an ed25519 key ({type(key).__name__})", path="--key")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SpecError(f"{path}: neither PEM nor base64", path="--key") from e
    if len(raw) != KEY_BYTES:
        raise SpecError(f"{path}: a raw ed25519 key has {KEY_BYTES} bytes, got {len(raw)}",
                        path="--key")
    return Ed25519PrivateKey.from_private_bytes(raw)


def site_signing_key(path: Path | None, *, site: str, registered: str | None
                     ) -> Ed25519PrivateKey | None:
    """The key a site signs with, checked against the one the hub registered for it.

    No key while one is registered is an error (the merge would refuse the contribution),
    as is a key whose public half is not the registered one.
    """
    if path is None:
        if registered:
            raise SpecError(f"site {site!r} has a registered public key: its contributions "
                            "must be signed; pass --key FILE", path="--key")
        return None
    key = load_private_key(path)
    if registered and public_key_b64(key) != registered.strip():
        raise SpecError(f"{path} is not the key registered for site {site!r} (registered "
                        f"public key {registered})", path="--key")
    if not registered:
        log.warning("signing, but the hub registered no key for site %s: it will not check",
                    site)
    return key


def main(argv: list[str] | None = None) -> int:
    """`meritrun keygen --out FILE`: write a site key, print the public key to register."""
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, 
        prog="meritrun keygen", description="Create an ed25519 key a site signs manifests with.")
    parser.add_argument("--out", type=Path, required=True, help="private key file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        public = generate_site_key(args.out, overwrite=args.force)
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"private key: {args.out} (keep it at the site)")
    print(f"public key (spec.sites[].publicKey): {public}")
    return 0
