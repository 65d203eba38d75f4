"""Test support: a real Prometheus server (Debian's package, on PATH or unpacked into the venv
by scripts/setup-prometheus.sh) that scrapes
given targets every second, answering PromQL over HTTP. Bound to 127.0.0.1, data in a temp
dir, stopped by the test that started it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .kube import free_port, wait_until
from .processes import spawn


def find_tool(name: str) -> str:
    """`prometheus` or `promtool`: on PATH, else beside this venv's python (setup.sh --dev)."""
    for found in (shutil.which(name), Path(sys.executable).parent / name, f"/usr/bin/{name}"):
        if found and Path(found).exists():
            return str(found)
    raise RuntimeError(f"{name} not found: run scripts/setup.sh --dev "
                       "(or scripts/setup-prometheus.sh .venv)")


def find_prometheus() -> str:
    return find_tool("prometheus")


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.workdir = workdir / "prometheus"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.targets = targets
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 30.0) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "meritrun-operator", "scrape_interval": "1s",
                                "scrape_timeout": "1s",
                                "static_configs": [{"targets": self.targets}]}]}))
        self.proc = spawn(
            [find_prometheus(), f"--config.file={config}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            self.workdir / "prometheus.log")
        wait_until(self._ready, timeout=timeout, what="prometheus /-/ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, *, timeout: float = 45.0,
                 accept: Any = lambda result: bool(result)) -> list[dict[str, Any]]:
        """Poll a PromQL query until accept(result) (the first samples take ~6 s)."""
        return wait_until(lambda: (r := self.query(expr)) and accept(r) and r, timeout=timeout,
                          interval=1.0, what=f"PromQL {expr}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
