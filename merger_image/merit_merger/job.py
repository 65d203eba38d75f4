"""One merge job, as the stage and the CLI both run it: verify, check quorum, merge, report.

Inputs are local: a base model dir and, per partition, either a PartitionSource (fetched and
ready to verify) or the ContributionRejected that fetching it already produced. Outputs go
to one local dir laid out like the stage's storage prefix: `model/` (with its card,
README.md), `merge_report.json`, `merge_layers.png` and, where mergekit has the method,
`mergekit.yaml`. With a held-out file the report scores base, partitions and merged model.
The report is written even when the quorum is not met (then QuorumNotMet is raised after
writing it).
Fetching and uploading belong to the callers.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meritrun.api import MergeSpec
from meritrun.errors import ContributionRejected, SpecError
from meritrun.stages import PartitionInput

from .engine import MergeResult, Progress, merge_models
from .methods import get_method
from .model_card import write_model_card
from .recipe import NO_EQUIVALENT, RECIPE_NAME, mergekit_recipe, write_recipe
from .report import PLOT_NAME, build_report, plot_layers, write_report
from .sources import PartitionSource
from .streamcheck import model_fingerprint
from .verification import (
    NormScan,
    QuorumNotMet,
    Verification,
    judge_norms,
    require_quorum,
    verify_partitions,
)

log = logging.getLogger(__name__)

MB = 1_000_000
Candidate = PartitionSource | ContributionRejected


@dataclass(frozen=True)
class MergeSettings:
    """Everything that decides a merge besides its inputs."""

    method: str = "token-weighted"
    params: Mapping[str, Any] = field(default_factory=dict)
    quorum: float = 1.0
    planned: int | None = None  # partitions in the run's plan (None: those given here)
    required: int | None = None  # accepted ones needed (None: the core's rule)
    outlier_factor: float = 5.0
    refuse_outliers: bool = False
    shard_size_bytes: int = 2000 * MB
    output_dtype: str | None = None
    device: str = "cpu"
    strict_dtype: bool = False
    threads: int | None = None  # CPU threads of the scan and the merge (None: one per core)


def merge_device(requested: str) -> str:
    """The torch device of a merge: `cuda` needs one (else a SpecError naming the field),
    `auto` takes one when present, anything else is `cpu` (without importing torch)."""
    if requested not in ("cuda", "auto"):
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise SpecError("cuda was asked for, and this merge Job sees no GPU (give the merge "
                        "Job a GPU in the template, or use cpu / auto)", path="merge.device")
    return "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"


def settings_from_spec(spec: MergeSpec, *, device: str | None = None,
                       planned: int | None = None, required: int | None = None,
                       threads: int | None = None) -> MergeSettings:
    """MergeSettings from the MeritRun spec's merge section (density from ota or merge;
    the device from merge.device unless given)."""
    ota = spec.ota
    density = spec.density
    if spec.method == "ota" and ota is not None and ota.density is not None:
        density = ota.density
    values: dict[str, Any] = {"density": density, "scale": spec.scale}
    if ota is not None:
        values |= {"power": ota.power, "epsilon": ota.epsilon}
    method = get_method(spec.method)
    params = method.parse_params(values, strict=False)
    return MergeSettings(
        method=method.key, params=dataclasses.asdict(params), quorum=spec.quorum,
        planned=planned, required=required, outlier_factor=spec.outlier_factor,
        refuse_outliers=spec.refuse_outliers,
        shard_size_bytes=spec.shard_size_mb * MB, device=device or merge_device(spec.device),
        threads=threads,
    )


@dataclass
class JobOutcome:
    out_dir: Path
    model_dir: Path
    report_path: Path
    report: dict[str, Any]
    extra_files: list[Path]


def run_merge_job(
    *, base_dir: Path, candidates: Sequence[Candidate], settings: MergeSettings, out_dir: Path,
    base_uri: str | None = None, locations: Mapping[str, str] | None = None,
    hashes_verified: frozenset[str] = frozenset(), progress: Progress | None = None,
    expected: Mapping[str, PartitionInput] | None = None, run: str | None = None,
    held_out: Path | None = None, streamed: bool = False,
) -> JobOutcome:
    """Verify, merge and report; `locations` names each partition's model for the recipe.

    `expected` (partition -> PartitionInput) adds the site and signature checks of
    partitions from other sites, and `run` the run their signed manifests must name.
    `held_out` (a local JSONL) adds the scores of base, partitions and merged model.
    `streamed`: inputs are read twice at most (verification.verify_partitions); the update
    norms are judged during the merge, and a partition refused then (an outlier with
    refuse_outliers, a LoRA whose weights overflow) is dropped and the others merged again.
    """
    started, out_dir = time.monotonic(), Path(out_dir)
    method = get_method(settings.method)
    params = method.parse_params(dict(settings.params))
    names = [c.name if isinstance(c, PartitionSource) else c.partition for c in candidates]
    sources = {c.name: c for c in candidates if isinstance(c, PartitionSource)}
    refused = [c for c in candidates if isinstance(c, ContributionRejected)]
    timings: dict[str, float] = {}
    verification = verify_partitions(
        list(sources.values()), base_dir=base_dir, method=method,
        outlier_factor=settings.outlier_factor, refuse_outliers=settings.refuse_outliers,
        hashes_verified=hashes_verified, strict_dtype=settings.strict_dtype,
        expected=expected, run=run, streamed=streamed, threads=settings.threads)
    refused += verification.refused
    timings["verify"] = verification.seconds
    base_info = {"uri": base_uri or str(base_dir), "fingerprint": model_fingerprint(base_dir)}
    common = dict(method=method, params=settings.params, candidates=names, sources=sources,
                  refused=refused, verification=verification, quorum=settings.quorum,
                  base=base_info)

    def quorum() -> None:
        try:
            require_quorum(len(verification.accepted), settings.planned or len(candidates),
                           settings.quorum, refused, needed=settings.required)
        except QuorumNotMet as e:
            timings["total"] = round(time.monotonic() - started, 3)
            report = build_report(**common, result=None, status="failed", reason=str(e),
                                  timings=timings)
            _token_bounds(report, expected)
            write_report(out_dir, report)
            raise

    def merge(observe: NormScan | None) -> MergeResult:
        return merge_models(
            base_dir=base_dir, partitions=verification.accepted, method=method.key,
            params=settings.params, out_dir=out_dir / "model",
            shard_size_bytes=settings.shard_size_bytes, output_dtype=settings.output_dtype,
            device=settings.device, progress=progress, observe=observe,
            threads=settings.threads)

    quorum()
    result = None
    while result is None:  # streamed: again without a partition the merge pass refused
        scan = NormScan([s.name for s in verification.accepted], raise_refusals=True) \
            if streamed and not verification.tensor_norms else None
        try:
            result = merge(scan)
        except ContributionRejected as r:
            _drop(verification, refused, [r], out_dir / "model")
            quorum()
            continue
        if scan is not None:
            late = judge_norms(verification, scan.norms(), settings.outlier_factor,
                               refuse=settings.refuse_outliers)
            if late:
                result = None
                _drop(verification, refused, late, out_dir / "model")
                quorum()
    for r in refused:
        log.warning("partition %s refused (%s): %s", r.partition, r.check, r.detail)
    accepted = verification.accepted
    timings |= {f"merge_{k}": v for k, v in result.seconds.items()}
    extra, mergekit = [], _recipe(method, params, base_info["uri"], accepted, result.weights,
                                  result.output_dtype, locations, out_dir)
    if mergekit.get("recipe"):
        extra.append(out_dir / RECIPE_NAME)
    evaluation = None
    if held_out is not None:
        evaluation = _score(base_dir, accepted, out_dir / "model", Path(held_out))
        timings["evaluate"] = evaluation.pop("seconds")
    timings["total"] = round(time.monotonic() - started, 3)
    report = build_report(**common, result=result, status="succeeded", timings=timings,
                          mergekit=mergekit, output={"model": "model"}, evaluation=evaluation)
    _token_bounds(report, expected)
    write_model_card(out_dir / "model", report, run=run)
    plot = plot_layers(out_dir / PLOT_NAME, report)
    if plot is not None:
        extra.append(plot)
        report["plots"] = [plot.name]
    path = write_report(out_dir, report)
    return JobOutcome(out_dir, out_dir / "model", path, report, extra)


def _drop(verification: Verification, refused: list[ContributionRejected],
          late: Sequence[ContributionRejected], model_dir: Path) -> None:
    """Refuse partitions the merge pass judged; the output built with them is deleted."""
    gone = {r.partition for r in late}
    verification.refused += late
    refused += late
    verification.accepted = [s for s in verification.accepted if s.name not in gone]
    shutil.rmtree(model_dir, ignore_errors=True)
    log.warning("merge pass refused %s: merging the others again", sorted(gone))


def _token_bounds(report: dict[str, Any], expected: Mapping[str, PartitionInput] | None) -> None:
    """Record beside each partition's claimed tokens the most its plan allowed (or None)."""
    for entry in report["partitions"]:
        want = (expected or {}).get(entry["name"])
        entry["token_bound"] = want.token_bound() if want is not None else None


def _recipe(method, params, base_uri: str, accepted: Sequence[PartitionSource],
            weights: Mapping[str, float], dtype: str, locations: Mapping[str, str] | None,
            out_dir: Path) -> dict[str, Any]:
    parts = [(s.name, (locations or {}).get(s.name, str(s.model_dir)), s.weights)
             for s in accepted]
    recipe = mergekit_recipe(method=method, params=dataclasses.asdict(params), base=base_uri,
                             partitions=parts, weights=weights, dtype=dtype)
    exact = method.mergekit is not None
    note = None if exact else NO_EQUIVALENT.format(method=method.key.upper())
    if recipe is None:
        return {"recipe": None, "exact": False, "note": note}
    write_recipe(out_dir / RECIPE_NAME, recipe, method=method,
                 locations=[base_uri, *(uri for _, uri, _ in parts)])
    if not exact:
        note = f"{note}; {RECIPE_NAME} holds the nearest recipe (token-weighted linear)"
    return {"recipe": RECIPE_NAME, "method": recipe["merge_method"], "exact": exact,
            "note": note}


def _score(base_dir: Path, accepted: Sequence[PartitionSource], merged: Path,
           held_out: Path) -> dict[str, Any]:
    """The report's `evaluation`; a held-out file that cannot be scored does not undo a good
    merge: the reason is recorded instead of the table."""
    from meritrun.errors import MeritRunError

    from .scoreboard import ModelRef, score_models

    started = time.monotonic()
    refs = {"base": ModelRef(base_dir),
            **{s.name: ModelRef(s.model_dir, base_dir) for s in accepted},
            "merged": ModelRef(merged)}
    try:
        evaluation = score_models(refs, held_out)
    except MeritRunError as e:
        log.warning("held-out scores skipped: %s", e)
        evaluation = {"error": str(e), "heldOut": str(held_out)}
    return {**evaluation, "seconds": round(time.monotonic() - started, 3)}
