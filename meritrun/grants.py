"""Where a local run keeps its sites' grant bundles: WORKDIR/grants/<name>.json, mode 0600.

Persistence only (a `meritrun.access.GrantStore`); the operator's twin is a Secret
(`merit_operator.grants`). What to issue and when to revoke: `meritrun.access` and the
pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .assignment import SiteGrant, parse_grant

log = logging.getLogger(__name__)


class FileGrantStore:
    """Local runs: WORKDIR/grants/<name>.json, readable by the owner only."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def attempt(self, name: str) -> int | None:
        try:
            return parse_grant(self.path(name).read_text()).attempt
        except (OSError, ValueError):
            return None

    def put(self, name: str, grant: SiteGrant) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path(name).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(grant.bundle_json())
        tmp.replace(self.path(name))

    def delete(self, name: str, *, attempt: int) -> None:
        if self.attempt(name) == attempt:
            self.path(name).unlink(missing_ok=True)


