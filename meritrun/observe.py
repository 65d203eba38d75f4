"""Reading what the stages wrote to storage, for both backends.

The pipeline decides from observations; this module gathers the storage half of them (the
cluster half is the backend's). A stage's output counts only once its completion marker
exists (plan.json, manifest.json, merge_report.json, search.json are always written last),
and only if it names this run's uid: a document of another run (left under a reused prefix,
or forged) is no result and is logged as such.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable

from . import artifacts
from .api import ArtifactRef, MeritRunSpec, MeritRunStatus, StageProgress
from .artifacts import RunId, names_run
from .assignment import sketch_output_prefix
from .errors import ObjectNotFound
from .pipeline import MergeOutcome, PartitionResult
from .progress import read_progress
from .stages import Plan, Verdict

log = logging.getLogger(__name__)


def _read_json(storage, key: str, run: RunId) -> dict | None:
    """The JSON document at key if it is this run's; None if absent or another run's."""
    try:
        raw = json.loads(storage.get_bytes(key))
    except ObjectNotFound:
        return None
    if not names_run(raw, run):
        _ignore(key, raw.get("run_uid") if isinstance(raw, dict) else None, run)
        return None
    return raw


def _ignore(key: str, got: object, run: RunId) -> None:
    log.warning("ignoring %s: it is for run uid %r, not this run's %r", key, got, run.uid)


def read_plan(storage, run: RunId, attempt: int) -> tuple[Plan | None, str]:
    key = f"{artifacts.plan_prefix(run, attempt)}/plan.json"
    raw = _read_json(storage, key, run)
    return (Plan.model_validate(raw) if raw else None), storage.uri_for(key)


def read_partition_result(
    storage, run: RunId, partition: str, attempt: int
) -> PartitionResult | None:
    prefix = artifacts.partition_prefix(run, partition, attempt)
    try:
        storage_bytes = storage.get_bytes(f"{prefix}/{artifacts.MANIFEST_NAME}")
    except ObjectNotFound:
        return None
    try:
        manifest = artifacts.PartitionManifest.model_validate_json(storage_bytes)
    except ValueError as e:
        # A malformed manifest is not a result; the merge's verification reports it in full.
        log.warning("partition %s attempt %d: unreadable manifest: %s", partition, attempt,
                    str(e)[:200])
        return None
    if manifest.run_uid != run.uid:
        _ignore(f"{prefix}/{artifacts.MANIFEST_NAME}", manifest.run_uid, run)
        return None
    return PartitionResult(
        tokens=manifest.tokens.supervised,
        artifact=ArtifactRef(uri=storage.uri_for(prefix),
                             sha256=hashlib.sha256(storage_bytes).hexdigest(),
                             bytes=sum(f.bytes for f in manifest.files.values())),
    )


def read_merge_outcome(storage, run: RunId, attempt: int) -> MergeOutcome | None:
    prefix = artifacts.merged_prefix(run, attempt)
    report = _read_json(storage, f"{prefix}/merge_report.json", run)
    if report is None:
        return None
    refused = {r["partition"]: f"{r.get('check')}: {r.get('detail', '')}"
               for r in report.get("refused", [])}
    ok = report.get("status", "succeeded") == "succeeded"
    return MergeOutcome(model_uri=storage.uri_for(f"{prefix}/model") if ok else None,
                        refused=refused)


def read_verdict(storage, run: RunId, partition: str, attempt: int) -> Verdict | None:
    prefix = artifacts.verdict_prefix(run, partition, attempt)
    raw = _read_json(storage, f"{prefix}/{artifacts.VERDICT_NAME}", run)
    return None if raw is None else Verdict.model_validate(raw)


def read_sketches_uri(storage, run: RunId, site: str, attempt: int) -> str | None:
    """The site's sketch prefix once its sketch.json (uploaded last, naming this run) is there."""
    prefix = sketch_output_prefix(run, site, attempt)
    return storage.uri_for(prefix) if _read_json(storage, f"{prefix}/sketch.json", run) else None


def read_search_best(storage, run: RunId, attempt: int) -> dict[str, float] | None:
    raw = _read_json(storage, f"{artifacts.search_prefix(run, attempt)}/search.json", run)
    return None if raw is None else {k: float(v) for k, v in raw["best"].items()}


def observe_storage(storage, run: RunId, status: MeritRunStatus | None, *,
                    fetch: Callable[..., Iterable] = map) -> dict:
    """Keyword arguments for pipeline.Observed, read for the attempts the status points at,
    under the uid the status records (a reset run's own; `run` is the object's). `fetch`
    maps the partitions' result reads (the operator passes a thread pool's `map`: K running
    partitions are K reads, each a round trip to the store, done at once)."""
    out: dict = {}
    if status is None:
        return out
    run = RunId(run.name, status.run_uid or run.uid)
    if status.plan is None and status.profile.attempt >= 1:
        out["plan"], out["plan_uri"] = read_plan(storage, run, status.profile.attempt)
    running = [p for p in status.partitions
               if p.state in ("Running", "AwaitingContribution") and p.attempt >= 1]
    found = fetch(lambda p: read_partition_result(storage, run, p.name, p.attempt), running)
    out["partition_results"] = {p.name: res for p, res in zip(running, found, strict=True)
                                if res is not None}
    out["verdicts"] = {p.name: v for p in status.partitions if p.state == "Verifying"
                       and (v := read_verdict(storage, run, p.name, p.attempt)) is not None}
    out["sketches"] = {sk.site: uri for sk in status.sketches or []
                       if sk.state == "AwaitingContribution"
                       and (uri := read_sketches_uri(storage, run, sk.site, sk.attempt))}
    if status.merge.attempt >= 1 and status.merge.state == "Running":
        out["merge_outcome"] = read_merge_outcome(storage, run, status.merge.attempt)
    search = status.search
    if search is not None and search.attempt >= 1 and search.state == "Running":
        out["search_best"] = read_search_best(storage, run, search.attempt)
    return out


def grant_candidates(spec: MeritRunSpec | None, status: MeritRunStatus | None,
                     plan: Plan | None = None) -> list[tuple[str, str]]:
    """(site, name) of every grant the run may have offered: its pull partitions (by the
    status, or by a plan read before the status recorded it: an offer whose status write was
    lost) and its sketch sites. Asked of the grant store every round, so a grant is revoked
    whatever the status says. Only pull sites: a run without them never touches the store."""
    def pull(site: str | None) -> bool:
        return spec is not None and spec.site_mode(site) == "pull"

    parts = status.partitions if status else []
    out = {(p.site, p.name) for p in parts if p.site and (p.grant or pull(p.site))}
    out |= {(p.site, p.name) for p in (plan.partitions if plan else []) if p.site and pull(p.site)}
    out |= {(sk.site, "sketch") for sk in (status.sketches if status else None) or []}
    out |= {(s.name, "sketch") for s in (spec.sites if spec else None) or []
            if s.mode == "pull" and s.sketches}
    return sorted(out)


def attach_progress(storage, run: RunId, status: MeritRunStatus, *,
                    queued: frozenset[str] = frozenset()) -> MeritRunStatus:
    """The status with each running partition's progress: `queued` (its job waits for a
    slot) or what its stage last wrote to progress.json. Shown, never decided on, so it is
    filled in after `decide`; a partition that is not running keeps its last progress."""
    run = RunId(run.name, status.run_uid or run.uid)
    for p in status.partitions:
        if p.state != "Running" or p.attempt < 1:
            continue
        if p.job in queued:
            p.progress = StageProgress(queued=True)
            continue
        found = read_progress(storage, artifacts.partition_prefix(run, p.name, p.attempt))
        p.progress = found or (None if p.progress and p.progress.queued else p.progress)
    return status
