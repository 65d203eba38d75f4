"""`meritrun run FILE --local`: load, validate, run with the local backend, show progress.

The workdir guard (meritrun.workdir) comes first: one runner per workdir, no stage left by a
dead runner, and the workdir's run must be this run with this spec (or `--fresh`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .api import TERMINAL_PHASES, MeritRun, MeritRunStatus, PartitionStatus
from .local import load_status, run_local
from .pipeline import Event
from .validation import load_run
from .workdir import STATUS_NAME, Change, admit, kill_leftover_stages, workdir_lock

_URI_SCHEMES = ("s3://", "file://", "http://", "https://")


def _absolute(uri: str | None, base: Path) -> str | None:
    """Relative paths in a YAML are relative to the YAML file, not to the shell's cwd."""
    if uri is None or uri.startswith(_URI_SCHEMES) or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def resolve_paths(run: MeritRun, base: Path) -> MeritRun:
    spec = run.spec
    data = spec.data.model_copy(update={
        "uri": _absolute(spec.data.uri, base),
        "held_out_uri": _absolute(spec.data.held_out_uri, base),
        "sources": [s.model_copy(update={"uri": _absolute(s.uri, base)})
                    for s in spec.data.sources] if spec.data.sources else None,
    })
    model = spec.base_model.model_copy(update={"uri": _absolute(spec.base_model.uri, base)})
    updates = {"data": data, "base_model": model}
    if spec.storage is not None and spec.storage.uri and "://" not in spec.storage.uri:
        root = Path(_absolute(spec.storage.uri, base) or "")
        updates["storage"] = spec.storage.model_copy(update={"uri": root.as_uri()})
    return run.model_copy(update={"spec": spec.model_copy(update=updates)})


def shown_state(p: PartitionStatus) -> str:
    """A partition's state as people read it: a created job still waiting for a free slot
    is Pending, not Running (the status keeps Running: the attempt has started for the
    pipeline, and `progress.queued` says it waits)."""
    return "Pending" if p.state == "Running" and p.progress and p.progress.queued else p.state


def running_detail(status: MeritRunStatus) -> str:
    """`p0 step 36/90 loss 0.501, p1 Pending`: what the running stages are doing now."""
    parts = []
    for p in status.partitions:
        state, prog = shown_state(p), p.progress
        if state == "Running" and prog and prog.total:
            loss = f" loss {prog.loss:.3f}" if prog.loss is not None else ""
            parts.append(f"{p.name} step {prog.step or 0}/{prog.total}{loss}")
        elif state in ("Running", "Pending") and status.plan is not None:
            parts.append(f"{p.name} {state}")
    return ", ".join(parts)


class ProgressView:
    """One tqdm bar over stages (profile, each partition, merge), the running stage's step,
    total and loss (from its progress.json, via the status), plus event lines."""

    def __init__(self) -> None:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, plain event lines in logs and CI.
        self.bar = tqdm(total=3, unit="stage", file=sys.stderr, dynamic_ncols=True,
                        disable=None)
        self._shown: tuple = ()

    def __call__(self, status: MeritRunStatus, events: list[Event]) -> None:
        for e in events:
            self.bar.write(f"[{e.type.lower():7}] {e.reason}: {e.message}")
        parts = status.partitions
        total = 2 + max(len(parts), 1) + (status.search is not None)
        done = (status.plan is not None) + sum(p.state in ("Succeeded", "Failed") for p in parts)
        done += status.merge.state in ("Succeeded", "Failed")
        done += status.search is not None and status.search.state in ("Succeeded", "Failed")
        detail = running_detail(status)
        if (total, done, status.phase, detail) != self._shown:  # redraw on change only
            self._shown = (total, done, status.phase, detail)
            self.bar.total, self.bar.n = total, done
            self.bar.set_description(status.phase, refresh=False)
            self.bar.set_postfix_str(detail, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def print_summary(status: MeritRunStatus) -> None:
    print(f"phase: {status.phase}" + (f" ({status.message})" if status.message else ""))
    if status.partitions:
        print(f"{'partition':<10} {'state':<12} {'attempt':>7} {'tokens':>9}  sources")
        for p in status.partitions:
            print(f"{p.name:<10} {shown_state(p):<12} {p.attempt:>7} {p.tokens or 0:>9}  "
                  f"{', '.join(p.sources)}")
    if status.model_uri:
        print(f"merged model: {status.model_uri}")


def print_scores(status: MeritRunStatus, cache: Path, *, endpoint: str | None = None,
                 region: str | None = None) -> bool:
    """The "did it help?" table from the merge report, when the run had a held-out set."""
    from .report import format_scoreboard, read_merge_scores

    if not status.model_uri:
        return False
    evaluation = read_merge_scores(status.model_uri, cache, endpoint=endpoint, region=region)
    if evaluation is None:
        return False
    print(format_scoreboard(evaluation))
    print("cells: mean held-out loss per supervised token (lower is better) and, in "
          "parentheses, exact-match accuracy; compare any models: meritrun compare MODEL... "
          "--data HELD_OUT")
    return True


@dataclass(frozen=True)
class LocalOutcome:
    status: MeritRunStatus
    ended_before: str | None  # the terminal phase the run already had when this call began
    changes: list[Change]  # live-editable fields taken over (suspend, deadline, backoffLimit)


def run_in_workdir(run: MeritRun, *, workdir: Path, fresh: bool = False,
                   on_round: Callable[[MeritRunStatus, list[Event]], None] | None = None,
                   **options) -> LocalOutcome:
    """The one way into the local runner: lock, clear leftovers, admit the run, drive it."""
    workdir = workdir.resolve()
    with workdir_lock(workdir):
        kill_leftover_stages(workdir)
        run_id, changes = admit(workdir, run, fresh=fresh)
        before = load_status(workdir / STATUS_NAME)
        for change in changes:
            print(f"taken over by the running run: {change}", file=sys.stderr)
        status = run_local(run, workdir=workdir, run_uid=run_id.uid, on_round=on_round,
                           **options)
    ended = before.phase if before is not None and before.phase in TERMINAL_PHASES else None
    return LocalOutcome(status, ended, changes)


def explain_rerun(outcome: LocalOutcome, command: str) -> None:
    """A finished run is not run again by running it again: say so, and how to."""
    if outcome.ended_before == "Failed":
        print(f"this run had already failed in this workdir; running the same spec again does "
              f"not retry it. Fix the cause, then start over: {command} --fresh",
              file=sys.stderr)
    elif outcome.ended_before == "Succeeded":
        print(f"this run had already succeeded in this workdir (result above); to run it "
              f"again: {command} --fresh", file=sys.stderr)


def run_file(path: Path, *, workdir: Path, parallel: int = 1, fresh: bool = False) -> int:
    run = resolve_paths(load_run(path), path.parent.resolve())
    view = ProgressView()
    try:
        outcome = run_in_workdir(run, workdir=workdir, fresh=fresh, max_parallel=parallel,
                                 on_round=view)
    finally:
        view.close()
    print_summary(outcome.status)
    storage = run.spec.storage
    print_scores(outcome.status, workdir.resolve() / "cache",
                 endpoint=storage and storage.endpoint, region=storage and storage.region)
    print(f"status: {workdir / STATUS_NAME}   logs: {workdir / 'jobs'}")
    explain_rerun(outcome, f"meritrun run {path} --local --workdir {workdir}")
    return 0 if outcome.status.phase == "Succeeded" else 1
