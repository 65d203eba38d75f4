"""`meritrun keygen`: the private key is 0600, also when --force replaces a looser file."""

from __future__ import annotations

import stat

from meritrun.cli import main


def test_force_resets_the_private_key_mode(tmp_path, capsys):
    key = tmp_path / "site.key"
    assert main(["keygen", "--out", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)
    assert main(["keygen", "--out", str(key)]) == 2  # refuses to replace without --force
    assert "exists" in capsys.readouterr().err
    before = key.read_bytes()
    assert main(["keygen", "--out", str(key), "--force"]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() != before
