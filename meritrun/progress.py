"""progress.json: how far a running stage is, written by the stage, read by both backends.

The train stage writes `{its output prefix}/progress.json` = {"stage", "step", "total",
"loss", "updated"} every few seconds (merit_trainer.publishing.ProgressFile); the backends copy
it into the partition's status (`progress`, via meritrun.observe.attach_progress) so `meritrun
run`, `kubectl get meritrun -o yaml` and the operator's status show step, total and loss
without reading job logs. It decides nothing: a missing or stale file only means nothing is
shown. The stage removes it before publishing the manifest, so an artifact holds exactly the
files its manifest lists.
"""

from __future__ import annotations

import json

from .api import StageProgress
from .artifacts import PROGRESS_NAME
from .errors import ObjectNotFound


def progress_key(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{PROGRESS_NAME}"


def read_progress(storage, prefix: str) -> StageProgress | None:
    """The stage's last progress, or None when it wrote none (or an unreadable one)."""
    try:
        raw = json.loads(storage.get_bytes(progress_key(prefix)))
        return StageProgress(step=raw.get("step"), total=raw.get("total"),
                             loss=raw.get("loss"), updated=raw.get("updated"))
    except (ObjectNotFound, ValueError, TypeError, AttributeError):
        return None
