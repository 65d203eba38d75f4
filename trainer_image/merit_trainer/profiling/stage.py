"""The profile stage: data + base model in, partition plan (and its evidence) out.

`profile_to_dir` is the one code path behind both the stage (`run_profile_stage`, which then
uploads to storage) and the `meritrun profile` CLI (which writes a local folder). Strategies:
conflictPCA sketches every source's gradient and splits along the PCA axes; bySite does the
same inside each site when every source has a gradient, else balances tokens; random and
manual need no gradient. A source whose data stays at its site gets its gradient from the
sketch set that site uploaded (remote.py checks it), so the hub profiles it without its data.
plan.json is written (and uploaded) last, so its presence means the profile is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from meritrun.api import PartitioningSpec, ProfilingSpec
from meritrun.artifacts import base_fingerprint
from meritrun.data import Example
from meritrun.errors import DataError, MeritRunError, SpecError, StageFailed
from meritrun.partitioning import (
    by_site_split,
    conflict_split,
    make_plan,
    manual_split,
    random_split,
)
from meritrun.stages import Plan, ProfileParams
from meritrun.storage import fetch_path, open_storage
from meritrun.storage.base import join_key

from .calibration import DEFAULT_MAX_LEN, count_supervised_tokens
from .conflict import cosine_matrix, principal_axes
from .gradients import load_tokenizer
from .inputs import load_sources, site_bindings
from .plots import plot_conflict, plot_pca
from .remote import check_site_sketches, expected_settings, fetch_site_sketches, reorder
from .sketchset import SketchSet, combine_sketch_sets, profile_sketches, save_sketch_set

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"


def _token_counts(model_dir: Path, examples: Mapping[str, Sequence[Example]], *,
                  max_len: int) -> dict[str, int]:
    tokenizer = load_tokenizer(model_dir)
    return {s: count_supervised_tokens(tokenizer, exs, max_len=max_len)
            for s, exs in examples.items()}


def _conflict_outputs(sketches: SketchSet, *, axes: int, centered: bool, out_dir: Path):
    """Conflict matrix + PCA; writes conflict.npy and sketch.npy/json. Returns the analysis."""
    n = len(sketches.names)
    c = cosine_matrix(sketches.matrix, sketches.names)
    analysis = principal_axes(c, min(n, max(axes, 2)), centered=centered)
    np.save(out_dir / "conflict.npy", c)
    save_sketch_set(sketches, out_dir / "sketch")
    return analysis


def split_sources(
    partitioning: PartitioningSpec,
    names: Sequence[str],
    tokens: Mapping[str, int],
    *,
    scores: Mapping[str, list[float]] | None,
    site_of: Mapping[str, str | None],
    settings: dict,
) -> list[list[str]]:
    """Dispatch to the strategy; records what it used in settings."""
    strategy, seed, k = partitioning.strategy, partitioning.seed, partitioning.partition_count()
    if strategy == "conflictPCA":
        axes = min(partitioning.axes, len(names))  # more axes than sources cannot be cut
        settings.update(axes=axes, partitions_requested=2**partitioning.axes)
        return conflict_split({s: v[:axes] for s, v in (scores or {}).items()}, tokens, axes,
                              seed=seed)
    if strategy == "random":
        return random_split(names, tokens, k, seed=seed)
    if strategy == "manual":
        return manual_split(partitioning.assignments or [], names)
    if strategy == "bySite":
        settings["within_site"] = "conflict" if scores else "tokens"
        return by_site_split(names, tokens, site_of, k, scores=scores, seed=seed)
    raise SpecError(f"unknown strategy {strategy!r}", path="spec.partitioning.strategy")


def _all_sketches(model_dir: Path, own: Mapping[str, Sequence[Example]],
                  site_sets: Mapping[str, SketchSet], profiling: ProfilingSpec, *,
                  order: Sequence[str], max_seq_len: int) -> SketchSet:
    """The hub's sketches of the sources it reads, plus the sites' sets, rows in plan order."""
    sets = [profile_sketches(model_dir, own, profiling, max_seq_len=max_seq_len)] if own else []
    return reorder(combine_sketch_sets([*sets, *site_sets.values()]), order)


def profile_to_dir(
    examples: Mapping[str, Sequence[Example]],
    model_dir: Path,
    out_dir: Path,
    *,
    profiling: ProfilingSpec,
    partitioning: PartitioningSpec,
    site_of: Mapping[str, str | None] | None = None,
    remote: Sequence[str] = (),
    site_sketches: Mapping[str, SketchSet] | None = None,
    max_seq_len: int = DEFAULT_MAX_LEN,
) -> Plan:
    """Profile, split and write plan.json (+ conflict.npy, sketch.npy/json, PNGs) to out_dir.

    site_sketches (site -> the sketch set it uploaded) stand in for the data of the site's
    sources: checked (remote.check_site_sketches), then profiled like the hub's own.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    site_of, strategy, site_sets = dict(site_of or {}), partitioning.strategy, site_sketches or {}
    names = list(examples) + [s for s in remote if s not in examples]
    if not names:
        raise DataError("the data holds no examples: nothing to profile")
    k = partitioning.partition_count()
    settings: dict = {"partitions_requested": k, "max_seq_len": max_seq_len,
                      "seed": partitioning.seed}
    if site_sets:
        expected = expected_settings(profiling, base=base_fingerprint(Path(model_dir)),
                                     max_seq_len=max_seq_len)
        differences = check_site_sketches(site_sets, expected=expected, site_of=site_of,
                                          sources=names, readable=list(examples))
        settings["site_sketches"] = {site: list(s.names) for site, s in site_sets.items()}
        if differences:
            settings["site_sketch_differences"] = differences
    sketched = {n for s in site_sets.values() for n in s.names}
    own = {s: exs for s, exs in examples.items() if s not in sketched}  # the hub sketches
    unknown = [s for s in remote if s not in sketched]  # no data and no sketch here
    wants_gradients = strategy == "conflictPCA" or (strategy == "bySite" and not unknown)
    if strategy == "conflictPCA" and unknown:
        raise SpecError(f"conflictPCA needs the gradients of every source; {unknown[0]!r} has "
                        "no data and no sketches here (give its uri, set sketches: true on its "
                        "site, or use bySite)", path="spec.data.sources")
    scores, explained, analysis = None, None, None
    if wants_gradients:
        sketches = _all_sketches(model_dir, own, site_sets, profiling, order=names,
                                 max_seq_len=max_seq_len)
        tokens = dict(sketches.tokens)
        analysis = _conflict_outputs(sketches, axes=partitioning.axes,
                                     centered=profiling.centered, out_dir=out_dir)
        scores = {s: analysis.scores[i].tolist() for i, s in enumerate(sketches.names)}
        explained = analysis.explained_variance
        settings.update(
            centered=profiling.centered, projection_dim=profiling.projection_dim,
            projection=sketches.settings["projection"], sketch_seed=profiling.seed,
            parameters=profiling.parameters, parameter_count=sketches.settings["parameter_count"],
            base=sketches.settings["base"], stride=profiling.stride,
            calibration_samples=profiling.calibration_samples,
            micro_batch_size=profiling.micro_batch_size,
            calibration=sketches.calibration, calibration_short=sketches.short,
        )
    else:
        tokens = _token_counts(model_dir, own, max_len=max_seq_len)
        tokens.update({n: c for s in site_sets.values() for n, c in s.tokens.items()})
    if unknown:  # their sites count their own tokens; the merge weights by the manifests
        tokens.update({s: 0 for s in unknown})
        settings["tokens_unknown"] = list(unknown)

    parts = split_sources(partitioning, names, tokens, scores=scores, site_of=site_of,
                          settings=settings)
    settings["partitions"] = len(parts)

    plan = make_plan(parts, strategy=strategy, tokens=tokens, site_of=site_of, scores=scores,
                     explained_variance=explained, settings=settings)
    if analysis is not None:
        plot_conflict(out_dir / "conflict.png", analysis.matrix, list(scores), parts,
                      centered=analysis.centered)
        plot_pca(out_dir / "pca.png", scores, parts, explained)
    (out_dir / PLAN_NAME).write_text(json.dumps(plan.model_dump(mode="json"), indent=2))
    log.info("plan: %s", "; ".join(f"{p.name}={'+'.join(p.sources)} ({p.tokens} tokens)"
                                   for p in plan.partitions))
    return plan


def run_profile_stage(params: ProfileParams, *, workdir: Path) -> Plan:
    """The `profile` stage: fetch inputs, profile, upload the outputs under params.output."""
    workdir = Path(workdir)
    endpoint, region = params.storage.endpoint, params.storage.region
    storage = open_storage(params.storage.uri, endpoint=endpoint, region=region)
    try:
        model_dir = fetch_path(params.base_model, workdir / "cache", endpoint=endpoint,
                               region=region)
    except (MeritRunError, OSError) as e:
        raise StageFailed(f"cannot fetch base model {params.base_model}: {e}") from e
    data = load_sources(params.data, workdir / "cache", endpoint=endpoint, region=region)
    out_dir, sketch_dir = workdir / "profile", workdir / "site-sketches"
    for stale in (out_dir, sketch_dir):  # a retried attempt must not reuse or upload old files
        shutil.rmtree(stale, ignore_errors=True)
    site_sets = fetch_site_sketches(storage, params.site_sketches, sketch_dir)
    plan = profile_to_dir(
        data.examples, model_dir, out_dir, profiling=params.profiling,
        partitioning=params.partitioning, site_of=site_bindings(params.data, params.sites),
        remote=data.remote, site_sketches=site_sets, max_seq_len=params.max_seq_len,
    )
    plan = plan.model_copy(update={"run_uid": params.run_uid})  # the reader checks it
    (out_dir / PLAN_NAME).write_text(json.dumps(plan.model_dump(mode="json"), indent=2))
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != PLAN_NAME)
    for path in [*files, out_dir / PLAN_NAME]:  # plan.json last: it marks completion
        storage.put_file(join_key(params.output.rstrip("/"),
                                  path.relative_to(out_dir).as_posix()), path)
    log.info("profile written to %s", storage.uri_for(params.output or ""))
    return plan
