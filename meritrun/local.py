"""The local backend: the same pipeline as the operator, with stages as local processes.

Each CreateJob becomes a process running the same entry point a Job's container runs
(`python -m merit_trainer.stage train --params ...`). The status is saved to
`WORKDIR/status.json` after every round, so an interrupted run resumes where it stopped:
a stage whose process vanished is started again under the same attempt, and a stage whose
artifact is already complete is not run twice. A pull site's grant goes to
`WORKDIR/grants/<run>-<partition>-grant.json` (0600): hand it to the site for
`meritrun contribute --assignment FILE`.

Stage processes die with their runner: each starts in its own process group, asks the kernel
to SIGKILL it when the runner dies (Linux), and carries the workdir's mark
(meritrun.workdir.stage_environment) so a rerun kills whatever is left before starting again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .api import TERMINAL_PHASES, MeritRun, MeritRunSpec, MeritRunStatus, StorageSpec
from .artifacts import RunId
from .conditions import now_utc
from .driver import ActionsFailed, run_round
from .errors import SpecError, TransientError, find_error_line
from .observe import attach_progress, grant_candidates, observe_storage
from .outage import Outage
from .pipeline import (
    CreateJob,
    DeleteJob,
    Event,
    JobObservation,
    Observed,
    OfferAssignment,
    Policy,
    RevokeGrant,
    exit_verdict,
)
from .stages import stage_command
from .workdir import stage_environment

log = logging.getLogger(__name__)
LOCAL_POLICY = Policy(backoff_base_seconds=1.0, backoff_max_seconds=10.0)


@dataclass
class _Proc:
    job: CreateJob
    log_path: Path
    popen: subprocess.Popen | None = None


def last_error_line(log_path: Path) -> str | None:
    """The stage's own one-line reason (its MERITRUN_ERROR line), else its last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return find_error_line(lines) or (lines[-1][:500] if lines else None)


def local_gpus() -> int:
    """GPUs this machine offers (CUDA_VISIBLE_DEVICES, else nvidia-smi), without torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def with_torchrun(argv: list[str], stage: str, gpus: int) -> list[str]:
    """The train stage on every local GPU: torchrun --standalone, one process per GPU, as a
    Kubernetes pod with that many GPUs runs it; anything else runs as it is."""
    if stage != "train" or gpus < 2 or argv[1] != "-m":
        return argv
    return [argv[0], "-m", "merit_trainer.launch", "--standalone", "--nproc_per_node",
            str(gpus), *argv[1:]]


def die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: the stage gets SIGKILL when the runner dies, even by SIGKILL (Linux)."""
    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the rerun's leftover sweep covers it
            return
        if os.getppid() != parent:  # the runner died before the request took effect
            os._exit(1)
    return arm


def stop_group(popen: subprocess.Popen, *, grace_s: float = 30.0) -> None:
    """SIGTERM the stage's process group (it and anything it started), SIGKILL if it lingers."""
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # what ignored SIGTERM, and anything the stage started that outlived it
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait()


class LocalBackend:
    """Runs stage processes, at most `max_parallel` at a time, in creation order."""

    def __init__(self, workdir: Path, *, max_parallel: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.max_parallel = max_parallel
        # Stages share the cores: oversubscribed torch threads slow tiny models down ~10x.
        threads = str(max(1, (os.cpu_count() or 1) // max_parallel))
        self.env = {"MERITRUN_TORCH_THREADS": threads, **os.environ, **(env or {}),
                    **stage_environment(workdir)}
        self.procs: dict[str, _Proc] = {}

    def create(self, job: CreateJob) -> None:
        if job.name in self.procs:
            return  # idempotent: already queued or running
        job_dir = self.workdir / "jobs" / job.name
        job_dir.mkdir(parents=True, exist_ok=True)
        params_path = job_dir / "params.json"
        params_path.write_text(job.params.model_dump_json(indent=2))
        self.procs[job.name] = _Proc(job, job_dir / "log.txt")

    def delete(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.popen and proc.popen.poll() is None:
            stop_group(proc.popen)

    def _start_queued(self) -> None:
        running = sum(1 for p in self.procs.values() if p.popen and p.popen.poll() is None)
        for name, proc in self.procs.items():
            if running >= self.max_parallel:
                break
            if proc.popen is None:
                job_dir = proc.log_path.parent
                argv = stage_command(proc.job.stage, str(job_dir / "params.json"),
                                     python=sys.executable)
                argv += ["--workdir", str(self._stage_workdir(proc.job, job_dir))]
                argv = with_torchrun(argv, proc.job.stage, local_gpus())
                log.debug("starting %s: %s", name, " ".join(argv))
                with proc.log_path.open("ab") as out:
                    proc.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                  env=self.env, cwd=job_dir,
                                                  start_new_session=True,
                                                  preexec_fn=die_with_parent(os.getpid()))
                running += 1

    def queued(self) -> frozenset[str]:
        """Jobs created but not started (more stages than --parallel slots)."""
        return frozenset(n for n, p in self.procs.items() if p.popen is None)

    def _stage_workdir(self, job: CreateJob, job_dir: Path) -> Path:
        """A train stage works in its partition's directory, shared by all its attempts, so
        a retry resumes from the last checkpoint (as a workVolume PVC does on Kubernetes)."""
        if job.stage == "train" and job.partition:
            return self.workdir / "work" / job.partition
        return job_dir / "work"

    def observe(self) -> dict[str, JobObservation]:
        self._start_queued()
        seen = {}
        for name, proc in self.procs.items():
            code = proc.popen.poll() if proc.popen else None
            if code is None:
                seen[name] = JobObservation("Active")
            elif code == 0:
                seen[name] = JobObservation("Succeeded")
            else:
                reason = last_error_line(proc.log_path) or f"exit code {code}"
                seen[name] = JobObservation("Failed", f"exit code {code}: {reason}",
                                            **exit_verdict(code))
        return seen

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.delete(name)


def load_status(path: Path) -> MeritRunStatus | None:
    if not path.exists():
        return None
    return MeritRunStatus.model_validate_json(path.read_text())


def save_status(path: Path, status: MeritRunStatus) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status.to_wire(), indent=2))
    tmp.replace(path)


def with_local_storage(run: MeritRun, workdir: Path) -> MeritRun:
    """The embedded default: artifacts in WORKDIR/store when the spec names no storage."""
    if run.spec.storage is not None:
        return run
    store = (workdir / "store").resolve()
    store.mkdir(parents=True, exist_ok=True)
    spec = run.spec.model_copy(update={"storage": StorageSpec(uri=store.as_uri())})
    return run.model_copy(update={"spec": spec})


def _resumed(status: MeritRunStatus | None) -> MeritRunStatus | None:
    """An earlier runner's stage processes ended with it (they were ours, not a failure of
    the attempt): forget that their Jobs were seen, so each is started again under the same
    attempt instead of counting as vanished."""
    if status is None:
        return None
    status = status.model_copy(deep=True)
    for stage in [status.profile, status.merge, *status.partitions, status.search]:
        if stage is not None:
            stage.job_seen = None
    return status


def refuse_kubeconfig_sites(spec: MeritRunSpec) -> None:
    """A local run has no cluster to send a kubeconfig site's Jobs to: say so, run nothing."""
    for i, site in enumerate(spec.sites or []):
        if site.mode == "kubeconfig":
            raise SpecError(f"site {site.name!r} is a kubeconfig site: a local run cannot start "
                            "Jobs on another cluster (it would train that site's partitions "
                            "here). Run it with the operator, or make the site mode pull",
                            path=f"spec.sites[{i}].mode")


class LocalRun:
    """The local adapter of `meritrun.driver.Backend`: processes, a folder, a 0600 grant file."""

    def __init__(self, run: MeritRun, *, run_uid: str, procs: LocalBackend, storage, grants,
                 status_path: Path) -> None:
        self.run, self.procs, self.storage, self.grants = run, procs, storage, grants
        self.run_id = RunId(run.metadata.name, run_uid)
        self.status_path = status_path
        self.events: list[Event] = []
        self.presented = False  # True when on_round shows the events to a person

    def observe(self, spec: MeritRunSpec | None, status: MeritRunStatus | None,
                now: datetime) -> Observed:
        name = self.run.metadata.name
        found = observe_storage(self.storage, self.run_id, status)
        held = self.grants.held(name, grant_candidates(spec, status, found.get("plan")))
        return Observed(run=self.run_id, now=now, generation=self.run.metadata.generation,
                        jobs=self.procs.observe(), grants=held, **found)

    def create_job(self, action: CreateJob) -> None:
        if action.cluster is not None:  # refused up front; never run a remote site's work here
            raise SpecError(f"job {action.name} belongs to cluster {action.cluster!r}",
                            path="spec.sites")
        self.procs.create(action)

    def delete_job(self, name: str, cluster: str | None) -> None:
        self.procs.delete(name)

    def offer_grant(self, action: OfferAssignment) -> None:
        if self.grants.offer(action):  # shown at the CLI's level: someone has to hand it over
            a = action.assignment
            log.warning("site %s: hand it %s, then at the site: meritrun contribute "
                        "--assignment %s.json --data <its data>%s", a.site,
                        self.grants.store.path(action.grant), action.grant,
                        " --sketch-only" if a.kind == "sketch" else "")

    def revoke_grant(self, action: RevokeGrant) -> None:
        self.grants.revoke(action)

    def post_event(self, event: Event) -> None:
        # Shown once: by the caller's presenter when it has one (`meritrun run`), else logged.
        warn = event.type == "Warning" and not self.presented
        (log.warning if warn else log.info)("%s: %s", event.reason, event.message)
        self.events.append(event)

    def write_status(self, status: MeritRunStatus) -> None:
        # Step, total and loss of each training partition (or: queued), for people to see.
        attach_progress(self.storage, self.run_id, status, queued=self.procs.queued())
        save_status(self.status_path, status)


def run_local(
    run: MeritRun, *, workdir: Path, run_uid: str, max_parallel: int = 1,
    poll_seconds: float = 0.5,
    policy: Policy = LOCAL_POLICY,
    on_round: Callable[[MeritRunStatus, list[Event]], None] | None = None,
    env: dict[str, str] | None = None, settle_rounds: int = 20,
) -> MeritRunStatus:
    """Drive one MeritRun to a terminal phase on this machine; returns the final status.

    A round whose actions failed is repeated (they are level-based); a run that ended but
    cannot revoke a grant or stop a stage after `settle_rounds` more rounds raises
    ActionsFailed naming them, rather than return as if all were well.
    `run_uid` names its results (meritrun.workdir.admit gives it, with the workdir lock
    held: meritrun.runner_cli.run_in_workdir is the way in).
    """
    from .access import GrantKeeper
    from .grants import FileGrantStore
    from .iam import issuer_from_env
    from .storage import open_storage

    refuse_kubeconfig_sites(run.spec)
    workdir.mkdir(parents=True, exist_ok=True)
    run = with_local_storage(run, workdir)
    storage_spec = run.spec.storage
    assert storage_spec is not None
    storage = open_storage(storage_spec.root_uri(), endpoint=storage_spec.endpoint,
                           region=storage_spec.region)
    grants = GrantKeeper(storage, issuer_from_env(storage, endpoint=storage_spec.endpoint,
                                                  region=storage_spec.region),
                         FileGrantStore(workdir / "grants"), endpoint=storage_spec.endpoint)
    status_path = workdir / "status.json"
    status = _resumed(load_status(status_path))
    procs = LocalBackend(workdir, max_parallel=max_parallel, env=env)
    backend = LocalRun(run, run_uid=run_uid, procs=procs, storage=storage, grants=grants,
                       status_path=status_path)
    backend.presented = on_round is not None
    unsettled, outage = 0, Outage()
    try:
        while True:
            backend.events = []
            failed: ActionsFailed | None = None
            try:
                decision = run_round(backend, run.spec, status, now=now_utc(), policy=policy)
            except ActionsFailed as e:  # logged by the driver; repeated by the next round
                decision, failed = e.decision, e
            except TransientError as e:  # could not observe (storage down): try again later
                outage.wait(e)
                continue
            outage.clear()
            status = decision.status
            if on_round:
                on_round(status, list(backend.events))
            if status.phase in TERMINAL_PHASES:
                if failed is None:
                    return status
                unsettled += 1
                if unsettled > settle_rounds:
                    raise failed
            if failed or not any(isinstance(a, CreateJob | DeleteJob)
                                 for a in decision.actions):
                time.sleep(poll_seconds)  # repeated offers are no work: do not spin on them
    finally:
        procs.stop_all()
