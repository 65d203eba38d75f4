"""Manifest signatures (meritrun.signing) and site keys (meritrun.keys), no storage, no torch."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from meritrun.artifacts import (
    FileEntry,
    PartitionManifest,
    TokenCounts,
    read_manifest,
    write_manifest,
)
from meritrun.errors import ContributionRejected, SpecError
from meritrun.keys import generate_site_key, load_private_key, main, site_signing_key
from meritrun.signing import (
    canonical_manifest_bytes,
    public_key_b64,
    sign_manifest,
    verify_manifest_signature,
)

SHA = "ab" * 32


@pytest.fixture
def manifest() -> PartitionManifest:
    return PartitionManifest(
        run="r", partition="p1", attempt=2, site="b", sources=["copy", "sort"],
        tokens=TokenCounts(supervised=160, total=560), base="sha256:" + "0" * 64,
        training={"learningRate": 3e-4, "epochs": 1.0, "lora": None, "betas": [0.9, 0.999]},
        files={"model/model.safetensors": FileEntry(sha256=SHA, bytes=1234)},
        site_data={"examples": {"copy": 40}, "ignored": {"upper": 3}},
    )


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "site.key"
    public = generate_site_key(path)
    return load_private_key(path), public


def _refused(manifest: PartitionManifest, public: str) -> ContributionRejected:
    with pytest.raises(ContributionRejected) as info:
        verify_manifest_signature(manifest, public)
    assert info.value.check == "signature" and info.value.partition == manifest.partition
    return info.value


def test_good_signature_verifies_after_a_json_round_trip(manifest, key, tmp_path):
    private, public = key
    signed = sign_manifest(manifest, private)
    assert signed.signature and manifest.signature is None  # a copy; the input is untouched
    write_manifest(tmp_path, signed)
    # Reordered keys and other indentation must not matter: verify what a reader gets back.
    raw = json.loads((tmp_path / "manifest.json").read_text())
    shuffled = json.dumps(dict(reversed(list(raw.items()))), indent=7)
    (tmp_path / "manifest.json").write_text(shuffled)
    back = read_manifest(tmp_path)
    assert canonical_manifest_bytes(back) == canonical_manifest_bytes(signed)
    verify_manifest_signature(back, public)


@pytest.mark.parametrize("change", [
    {"tokens": TokenCounts(supervised=161, total=560)},  # inflate its merge weight
    {"attempt": 3},  # replay for another attempt
    {"partition": "p0"},  # replay for another partition
    {"files": {"model/model.safetensors": FileEntry(sha256="cd" * 32, bytes=1234)}},
    {"site_data": {"examples": {"copy": 40}, "ignored": {}}},  # extra fields are signed too
])
def test_tampered_manifest_is_refused(manifest, key, change):
    private, public = key
    tampered = sign_manifest(manifest, private).model_copy(update=change)
    detail = _refused(tampered, public).detail
    assert "does not match" in detail


def test_wrong_key_is_refused(manifest, key, tmp_path):
    private, _ = key
    other_public = generate_site_key(tmp_path / "other.key")
    _refused(sign_manifest(manifest, private), other_public)


def test_missing_or_malformed_signature_is_refused(manifest, key):
    _, public = key
    assert "not signed" in _refused(manifest, public).detail
    assert "base64" in _refused(manifest.model_copy(update={"signature": "%%%"}), public).detail
    short = base64.b64encode(b"x" * 10).decode()
    assert "64 bytes" in _refused(manifest.model_copy(update={"signature": short}), public).detail


def test_a_malformed_registered_key_is_a_spec_error(manifest, key):
    private, _ = key
    signed = sign_manifest(manifest, private)
    with pytest.raises(SpecError, match="publicKey"):
        verify_manifest_signature(signed, base64.b64encode(b"short").decode())


def test_signing_with_raw_key_bytes_matches_the_key_object(manifest, key):
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    private, public = key
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert sign_manifest(manifest, raw).signature == sign_manifest(manifest, private).signature
    assert public_key_b64(private) == public


def test_key_file_is_private_and_loads_as_pem_or_base64(tmp_path):
    path = tmp_path / "k" / "site.key"
    public = generate_site_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(public)) == 32
    with pytest.raises(SpecError, match="refusing to replace"):
        generate_site_key(path)
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    raw = load_private_key(path).private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    (tmp_path / "raw.key").write_text(base64.b64encode(raw).decode() + "\n")
    assert public_key_b64(load_private_key(tmp_path / "raw.key")) == public
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(SpecError, match="neither PEM nor base64"):
        load_private_key(tmp_path / "bad.key")


def test_site_signing_key_checks_the_registered_key(key, tmp_path):
    _, public = key
    path = tmp_path / "site.key"
    assert public_key_b64(site_signing_key(path, site="b", registered=public)) == public
    assert site_signing_key(None, site="b", registered=None) is None
    with pytest.raises(SpecError, match="must be signed"):
        site_signing_key(None, site="b", registered=public)
    generate_site_key(tmp_path / "other.key")
    with pytest.raises(SpecError, match="not the key registered"):
        site_signing_key(tmp_path / "other.key", site="b", registered=public)


def test_keygen_prints_the_public_key_to_register(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "new.key")]) == 0
    printed = capsys.readouterr().out
    public = printed.split("publicKey): ")[1].strip()
    assert public_key_b64(load_private_key(tmp_path / "new.key")) == public
    assert main(["--out", str(tmp_path / "new.key")]) == 2  # never overwrites silently
