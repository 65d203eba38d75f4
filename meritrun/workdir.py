"""One workdir, one run: what keeps the local runner from answering for another run.

A workdir remembers the run it holds in `run.json` (its name, its uid, the spec and the
spec's sha256). A later `meritrun run` in the same workdir resumes that run only if it is the
same run with the same spec; another name or a changed spec is refused with what differs,
unless `--fresh` moves the old run aside and starts a new one (a new uid, so none of the old
plan, manifests or model can be mistaken for the new run's). What a live run may change is
the CRD's rule (meritrun.api.rules.MUTABLE_FIELDS; `self == oldSelf` on the rest on
Kubernetes): those changes are taken over without --fresh.

One runner at a time: an flock on `WORKDIR/.lock`, held for the whole run, with the holder's
pid in the file for the refusal. Stage processes carry `STAGE_OF_ENV=<workdir>` in their
environment, so a rerun finds the stages a SIGKILLed runner left behind and kills them before
it starts any: one attempt never has two writers.

Not here: the run loop (meritrun.local) and the presentation (meritrun.runner_cli).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from .api import MeritRun
from .api.rules import MUTABLE_FIELDS, MUTABLE_NOTE
from .artifacts import RunId
from .errors import WorkdirError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RECORD_NAME = "run.json"
STATUS_NAME = "status.json"
PREVIOUS_NAME = "previous"
RECORD_FORMAT = "meritrun.workdir/v1"
STAGE_OF_ENV = "MERITRUN_STAGE_OF"
_RUN_STATE = (STATUS_NAME, RECORD_NAME, "jobs", "grants")  # what --fresh moves aside


class RunRecord(BaseModel):
    """run.json: which run this workdir holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str = RECORD_FORMAT
    name: str
    run_uid: str
    spec_sha256: str
    spec: dict[str, Any]

    @property
    def run_id(self) -> RunId:
        return RunId(self.name, self.run_uid)


@dataclass(frozen=True)
class Change:
    path: str  # e.g. spec.training.learningRate
    old: Any
    new: Any

    @property
    def mutable(self) -> bool:
        """Under a field a live run may change (the CRD's rule); anything else is fixed."""
        return self.path.removeprefix("spec.").split(".")[0].split("[")[0] in MUTABLE_FIELDS

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


def spec_document(run: MeritRun) -> dict[str, Any]:
    """The spec as compared and hashed: every field by its YAML name, defaults filled in."""
    return run.spec.model_dump(mode="json", by_alias=True)


def spec_sha256(document: dict[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_changes(old: Any, new: Any, path: str = "spec") -> list[Change]:
    """Every leaf that differs, by field path (lists of equal length element by element)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted(set(old) | set(new))
                for c in spec_changes(old.get(key, _MISSING), new.get(key, _MISSING),
                                      f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (o, n) in enumerate(zip(old, new, strict=True))
                for c in spec_changes(o, n, f"{path}[{i}]")]
    return [] if old == new else [Change(path, old, new)]


def new_run_uid() -> str:
    """A local run's uid: made once, when the workdir starts the run."""
    return uuid.uuid4().hex[:12]


def read_record(workdir: Path) -> RunRecord | None:
    path = workdir / RECORD_NAME
    if not path.exists():
        return None
    try:
        return RunRecord.model_validate_json(path.read_text())
    except ValueError as e:
        raise WorkdirError(f"{path} is not a workdir record ({str(e)[:200]}); start over "
                           "with --fresh") from e


def write_record(workdir: Path, record: RunRecord) -> None:
    tmp = workdir / f"{RECORD_NAME}.tmp"
    tmp.write_text(record.model_dump_json(indent=2))
    tmp.replace(workdir / RECORD_NAME)


def record_for(run: MeritRun, *, run_uid: str) -> RunRecord:
    document = spec_document(run)
    return RunRecord(name=run.metadata.name, run_uid=run_uid, spec=document,
                     spec_sha256=spec_sha256(document))


def recorded_uid(workdir: Path) -> str | None:
    """runUid of the workdir's status.json, if any (read raw: no model to drift from)."""
    path = workdir / STATUS_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("runUid") or ""
    except (ValueError, AttributeError):
        return ""


def move_aside(workdir: Path) -> Path | None:
    """--fresh: the old run's status, record, job logs and grants go to WORKDIR/previous/
    (replacing an older one there). Its artifacts stay in storage under their own uid."""
    present = [workdir / name for name in _RUN_STATE if (workdir / name).exists()]
    if not present:
        return None
    previous = workdir / PREVIOUS_NAME
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for path in present:
        path.rename(previous / path.name)
    return previous


def admit(workdir: Path, run: MeritRun, *, fresh: bool = False) -> tuple[RunId, list[Change]]:
    """The run this workdir runs now, and the live-editable changes taken over.

    Raises WorkdirError, naming what differs, for another run or a changed spec.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if fresh and (previous := move_aside(workdir)) is not None:
        log.warning("--fresh: the earlier run's status and logs are now in %s", previous)
    record, name = read_record(workdir), run.metadata.name
    if record is None:
        if recorded_uid(workdir) is not None:
            raise WorkdirError(f"{workdir} holds a run status without a {RECORD_NAME} (made "
                               "by an older meritrun): it cannot tell which run it is. Start "
                               "over with --fresh, or use another --workdir")
        record = record_for(run, run_uid=new_run_uid())
        write_record(workdir, record)
        return record.run_id, []
    if record.name != name:
        raise WorkdirError(f"{workdir} holds run {record.name!r} (uid {record.run_uid}), not "
                           f"{name!r}. Use another --workdir, or --fresh to start over here "
                           f"(the old run's status moves to {PREVIOUS_NAME}/)")
    changes = spec_changes(record.spec, spec_document(run))
    fixed = [c for c in changes if not c.mutable]
    if fixed:
        listed = "\n".join(f"  {c}" for c in fixed)
        raise WorkdirError(
            f"the spec of run {name!r} changed since it started in {workdir}:\n{listed}\n"
            f"Its plan and results belong to the spec it started with. Use --fresh to start "
            f"over with this spec (a new run uid; the old status moves to {PREVIOUS_NAME}/), "
            f"or another --workdir. ({MUTABLE_NOTE})")
    uid = recorded_uid(workdir)
    if uid is not None and uid != record.run_uid:
        raise WorkdirError(f"{workdir}/{STATUS_NAME} is for run uid {uid!r}, but "
                           f"{RECORD_NAME} says {record.run_uid!r}: start over with --fresh")
    if changes:
        write_record(workdir, record_for(run, run_uid=record.run_uid))
    return record.run_id, changes


def resumable(workdir: Path, run: MeritRun) -> bool:
    """Whether `admit` would take this run as the workdir's (same run, same spec) and it has
    not failed: the demo then resumes it (or shows its result) instead of starting over."""
    record = read_record(workdir)
    if record is None or record.name != run.metadata.name:
        return False
    if any(not c.mutable for c in spec_changes(record.spec, spec_document(run))):
        return False
    try:
        phase = json.loads((workdir / STATUS_NAME).read_text()).get("phase")
    except (OSError, ValueError, AttributeError):
        return True  # no status yet: the run had not made a round
    return phase != "Failed"


# --- one runner per workdir -----------------------------------------------------------


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold WORKDIR/.lock for the block; WorkdirError (naming the holder's pid) if taken."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirError(f"{workdir} is in use by another meritrun runner (pid "
                               f"{holder}); wait for it to finish or stop it, or use another "
                               "--workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- stages a dead runner left behind ----------------------------------------------------


def stage_environment(workdir: Path) -> dict[str, str]:
    """What a stage process of this workdir carries, so a rerun can find it."""
    return {STAGE_OF_ENV: str(workdir.resolve())}


def leftover_stages(workdir: Path, *, proc: Path = Path("/proc")) -> list[int]:
    """Pids of live processes started as stages of this workdir (Linux: /proc)."""
    mark = f"{STAGE_OF_ENV}={workdir.resolve()}".encode()
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if mark in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def kill_leftover_stages(workdir: Path, *, timeout_s: float = 30.0) -> list[int]:
    """SIGKILL every leftover stage of this workdir and wait until they are gone.

    Called with the workdir lock held: no live runner owns them, so none may keep writing
    while this runner starts the same attempt again.
    """
    pids = leftover_stages(workdir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        raise WorkdirError(f"stage processes {alive} of {workdir} did not exit after SIGKILL")
    if pids:
        log.warning("stopped %d stage process(es) left by an earlier runner: %s", len(pids),
                    ", ".join(map(str, pids)))
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie, or a pid gone, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
