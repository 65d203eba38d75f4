"""Fails any test that leaves child processes running."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_leaked_processes():
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()
              and p.status() != psutil.STATUS_ZOMBIE]
    for p in leaked:
        p.kill()
    assert not leaked, f"test left processes running: {[p.cmdline()[:3] for p in leaked]}"
