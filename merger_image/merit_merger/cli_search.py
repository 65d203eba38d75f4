"""The two edges of the mixture search: `meritrun search` (local dirs) and the `search` stage.

Both gather inputs, call `merit_merger.search.search_mixtures` and write the same outputs
(search.json + search.png). The stage fetches the base, the held-out data and every partition
artifact (manifest first, then its files checked against it) from storage, and uploads
search.json last, so a reader that sees it sees a complete result. No search logic here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from meritrun.api.limits import MAX_SEARCH_CANDIDATES, lattice_candidates
from meritrun.artifacts import MANIFEST_NAME, base_fingerprint, read_manifest
from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.errors import ContributionRejected, MeritRunError, SpecError
from meritrun.stages import SearchParams

from .evaluation import json_safe
from .fetch import fetch_partition
from .search import Candidate, dirichlet_candidates, search_mixtures, simplex_grid
from .search_plot import format_ranking_table, plot_search

log = logging.getLogger(__name__)

SEARCH_JSON, SEARCH_PNG = "search.json", "search.png"
DIRICHLET_SEED = 0  # default of spec.mixtureSearch.seed: a re-run draws the same candidates
TABLE_ROWS = 25


def make_candidates(n_experts: int, *, grid: int = 8, dirichlet: int | None = None,
                    seed: int = DIRICHLET_SEED) -> list[Candidate]:
    """Dirichlet draws (plus uniform) when `dirichlet` is set, else the 1/grid lattice; at most
    MAX_SEARCH_CANDIDATES either way, counted before any is built (each is a merge)."""
    if dirichlet:
        if dirichlet > MAX_SEARCH_CANDIDATES:
            raise SpecError(f"{dirichlet} Dirichlet draws: at most {MAX_SEARCH_CANDIDATES}",
                            path="spec.mixtureSearch.dirichlet")
        return dirichlet_candidates(n_experts, dirichlet, seed)
    count = lattice_candidates(grid, n_experts)
    if count > MAX_SEARCH_CANDIDATES:
        raise SpecError(f"a 1/{grid} lattice has {count} points for {n_experts} experts (at "
                        f"most {MAX_SEARCH_CANDIDATES}): lower the grid or use Dirichlet draws",
                        path="spec.mixtureSearch.grid")
    points = simplex_grid(n_experts, grid)
    if not points:
        raise SpecError(f"a 1/{grid} lattice with every weight >= 1/{grid} has no point for "
                        f"{n_experts} experts: raise the grid or use Dirichlet draws",
                        path="spec.mixtureSearch.grid")
    return points


def write_search_outputs(search: dict, out_dir: Path) -> dict[str, Path]:
    """search.json and search.png under out_dir (the plot first: the JSON marks completion)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_search(search, out_dir / SEARCH_PNG)
    path = out_dir / SEARCH_JSON
    path.write_text(json.dumps(json_safe(search), indent=2, allow_nan=False))
    return {SEARCH_PNG: png, SEARCH_JSON: path}


# --- the `search` stage ---------------------------------------------------------------------

def run_search_stage(params: SearchParams, *, workdir: Path) -> dict:
    """Rank the candidate mixtures of params.partitions; writes {output}/search.json + plot."""
    from meritrun.storage import fetch_path, open_storage

    workdir = Path(workdir)
    s = params.storage
    storage = open_storage(s.uri, endpoint=s.endpoint, region=s.region,
                           access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                           secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    base_dir = fetch_path(params.base_model, workdir / "base", endpoint=s.endpoint,
                          region=s.region)
    held_out = fetch_path(params.held_out, workdir / "data", endpoint=s.endpoint,
                          region=s.region)
    fingerprint = base_fingerprint(Path(base_dir))
    expert_dirs = []
    for part in params.partitions:
        source, _ = fetch_partition(storage, part.name, part.prefix,
                                    workdir / "partitions" / part.name)
        if isinstance(source, ContributionRejected):
            raise source
        path, manifest = source.artifact_dir, source.manifest
        if part.run_uid is not None and (manifest is None or manifest.run_uid != part.run_uid):
            raise ContributionRejected(part.name, "run", "the manifest is for run uid "
                                       f"{manifest.run_uid if manifest else None!r}, not "
                                       f"{part.run_uid!r}")
        if manifest is None or path is None or manifest.base != fingerprint:
            # A proxy built on another base mixes unrelated deltas: refuse it, do not rank it.
            raise ContributionRejected(part.name, "base", "trained from "
                                       f"{manifest.base if manifest else None}, base is "
                                       f"{fingerprint}")
        expert_dirs.append(path)
    names = [p.name for p in params.partitions]
    spec = params.search
    candidates = make_candidates(len(names), grid=spec.grid, dirichlet=spec.dirichlet,
                                 seed=spec.seed)
    result = search_mixtures(base_dir=Path(base_dir), expert_dirs=expert_dirs, names=names,
                             eval_path=Path(held_out), candidates=candidates,
                             objective=spec.objective)
    search = {
        "run": params.run, "run_uid": params.run_uid, "attempt": params.attempt,
        "method": f"dirichlet({spec.dirichlet}, seed={spec.seed})" if spec.dirichlet
        else f"grid(1/{spec.grid})",
        "partitions": {p.name: storage.uri_for(p.prefix) for p in params.partitions},
        **result.to_dict(),
    }
    paths = write_search_outputs(search, workdir / "out")
    storage.put_file(f"{params.output}/{SEARCH_PNG}", paths[SEARCH_PNG])
    storage.put_file(f"{params.output}/{SEARCH_JSON}", paths[SEARCH_JSON])  # last: completion
    log.info("search done: best %s (%s %.4f)", search["best"], spec.objective,
             search["best_score"])
    return search


# --- `meritrun search` ----------------------------------------------------------------------

def expert_name(path: Path) -> str:
    if (path / MANIFEST_NAME).is_file():
        return read_manifest(path).partition
    return path.resolve().name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, prog="meritrun search",
                                description="Rank data-mixture weights by merged proxies.")
    p.add_argument("--base", required=True, type=Path, help="base model directory (theta0)")
    p.add_argument("--experts", required=True, nargs="+", type=Path,
                   help="partition artifact dirs or HF model dirs fine-tuned from the base")
    p.add_argument("--names", nargs="+", help="one name per expert (default: partition/dir)")
    p.add_argument("--eval", required=True, type=Path, dest="eval_path",
                   help="held-out JSONL")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--grid", type=int, default=8, help="lattice denominator (default 8)")
    how.add_argument("--dirichlet", type=int, help="N Dirichlet(1) draws plus uniform")
    p.add_argument("--seed", type=int, default=DIRICHLET_SEED, help="seed of the draws")
    p.add_argument("--objective", default="mean-loss",
                   choices=["mean-loss", "mean-accuracy", "weighted"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("meritrun-search"), help="output directory")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = args.names or [expert_name(d) for d in args.experts]
    if len(names) != len(args.experts) or len(set(names)) != len(names):
        print("error: --names needs one distinct name per expert", file=sys.stderr)
        return 2
    try:
        candidates = make_candidates(len(names), grid=args.grid, dirichlet=args.dirichlet,
                                     seed=args.seed)
        result = search_mixtures(base_dir=args.base, expert_dirs=args.experts, names=names,
                                 eval_path=args.eval_path, candidates=candidates,
                                 objective=args.objective, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)
        search = result.to_dict()
        paths = write_search_outputs(search, args.out)
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_ranking_table(search, top=TABLE_ROWS))
    if len(search["ranking"]) > TABLE_ROWS:
        print(f"... {len(search['ranking']) - TABLE_ROWS} more in {paths[SEARCH_JSON]}")
    best = ", ".join(f"{n}={w:.3f}" for n, w in search["best"].items())
    print(f"\nbest mixture: {best}  ({args.objective} {search['best_score']:.4f})")
    print(f"wrote {paths[SEARCH_JSON]} and {paths[SEARCH_PNG]}")
    return 0
