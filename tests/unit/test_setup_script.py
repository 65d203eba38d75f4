"""scripts/setup.sh installs nothing system-wide and stops nothing (issue 12, point 5).

The tests start and stop their own Prometheus on a free port, so setup only has to make the
binaries available: when they are missing, Debian's package is downloaded (no root) and
unpacked into the venv. The behaviour test runs scripts/setup-prometheus.sh against a stand-in
`apt-get` that serves a .deb built here with the real dpkg-deb, so no network is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_kills_processes_or_installs_packages(script: Path):
    text = "\n".join(line for line in script.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    for banned in (r"\bpkill\b", r"\bkillall\b", r"\bsystemctl\b", r"apt-get\s+(-\S+\s+)*install",
                   r"\bdpkg\s+-i\b"):
        assert not re.search(banned, text), f"{script.name} runs {banned}"


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_setup_prometheus_unpacks_into_the_venv_only(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: prometheus\nVersion: 9.9\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: stand-in\n")
    for name in ("prometheus", "promtool"):
        _executable(pkg / "usr" / "bin" / name, f"#!/bin/sh\necho '{name}, version 9.9'\n")
    deb = tmp_path / "prometheus_9.9_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    fake_bin, calls = tmp_path / "fakebin", tmp_path / "calls.txt"
    fake_bin.mkdir()
    _executable(fake_bin / "apt-get",
                f'#!/bin/sh\necho "apt-get $*" >> {calls}\n'
                f'[ "$1" = download ] && cp {deb} . && exit 0\nexit 1\n')
    _executable(fake_bin / "sudo", f'#!/bin/sh\necho "sudo $*" >> {calls}\nexit 1\n')
    venv = tmp_path / "venv"
    venv.mkdir()
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    done = subprocess.run([str(ROOT / "scripts" / "setup-prometheus.sh"), str(venv)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["apt-get download prometheus"]  # no sudo, no install
    for name in ("prometheus", "promtool"):
        out = subprocess.run([str(venv / "bin" / name), "--version"], capture_output=True,
                             text=True, check=True).stdout
        assert out.startswith(f"{name}, version 9.9")
        assert (venv / "bin" / name).resolve().is_relative_to(venv.resolve())
