"""`meritrun merge`: merge partition artifacts on one machine, with the stage's checks.

    meritrun merge --method ota --base BASE_DIR --out OUT_DIR PART_DIR_OR_URI... [options]
    meritrun merge --recipe mergekit.yaml --out OUT_DIR

Partitions are artifact dirs (manifest.json + model/ ...), or file:// / s3:// URIs of one
(downloaded and sha256-verified on the way), or plain Hugging Face model (or LoRA adapter)
directories: those carry no manifest, so verification checks only tensor names, shapes,
dtypes and finiteness (no hashes, base fingerprint or token count) and the methods that need
token counts or second moments refuse them. `--recipe` runs a mergekit recipe of the methods
MeritRun has (merit_merger.recipe). Runs the same job as the merge stage (verify, quorum,
merge, report, model card; `--held-out` adds the scores) and prints a table of partitions with
tokens, weights and status. Exit codes: 0 merged, 2 error, 3 quorum not met. Printing lives
here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
from pathlib import Path

from meritrun.artifacts import MANIFEST_NAME
from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.errors import ContributionRejected, MeritRunError, SpecError

from .checks import load_partition
from .fetch import fetch_partition
from .job import MB, MergeSettings, run_merge_job
from .methods import METHODS, get_method
from .recipe import RecipePlan, recipe_plan
from .sources import PartitionSource
from .verification import QuorumNotMet

_PARAM_FLAGS = ("density", "power", "epsilon", "scale")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, prog="meritrun merge",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("partitions", nargs="*",
                   help="partition artifact dirs, file:// / s3:// URIs of one, or plain HF "
                        "model dirs")
    p.add_argument("--method", default=None,
                   help=f"one of {', '.join(sorted(METHODS))} (camelCase spec names too; "
                        "default token-weighted)")
    p.add_argument("--recipe", type=Path,
                   help="a mergekit recipe (models, merge_method, parameters) to run instead "
                        "of --method and PARTITION...")
    p.add_argument("--base", help="base model dir (or URI); a recipe's base_model otherwise")
    p.add_argument("--held-out", help="held-out JSONL: score base, partitions and merged model")
    p.add_argument("--out", required=True, type=Path, help="output dir (model/ + report)")
    p.add_argument("--density", type=float, help="TIES/DARE density; OTA: FFG keep fraction")
    p.add_argument("--power", type=float, help="OTA exponent p (default 0.5)")
    p.add_argument("--epsilon", type=float, help="OTA epsilon (default 1e-26)")
    p.add_argument("--scale", type=float, help="lambda of task arithmetic / TIES / DARE")
    p.add_argument("--quorum", type=float, default=1.0, help="fraction of partitions needed")
    p.add_argument("--refuse-outliers", action="store_true", help="refuse, not just flag")
    p.add_argument("--outlier-factor", type=float, default=5.0, help="x median update norm")
    p.add_argument("--shard-size-mb", type=int, default=2000, help="output shard size (MB)")
    p.add_argument("--dtype", help="output dtype (default: the base's)")
    p.add_argument("--device", default="cpu", help="torch device for the math (cpu, cuda)")
    p.add_argument("--endpoint", help="S3 endpoint for s3:// URIs")
    p.add_argument("--workdir", type=Path, help="download dir for remote inputs")
    return p


def _name_of(path: Path, taken: set[str]) -> str:
    try:
        name = json.loads((path / MANIFEST_NAME).read_text())["partition"]
    except (OSError, ValueError, KeyError, TypeError):
        parts = [p for p in path.parts if not re.fullmatch(r"attempt-\d+", p)]
        name = parts[-1] if parts else "partition"
    base, i = str(name), 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def plain_source(path: Path, name: str) -> PartitionSource:
    """A Hugging Face model (or peft adapter) dir without a manifest, as a merge input."""
    lora = (path / "adapter_config.json").is_file()
    if not lora and not (path / "config.json").is_file():
        raise ContributionRejected(name, "missing-file", f"{MANIFEST_NAME} is missing and "
                                   f"{path} is no Hugging Face model directory (no config.json)")
    return PartitionSource(name, path, 1, "lora" if lora else "full")


def _gather(args, workdir: Path, uris: list[str]):
    """(base dir, candidates, names verified on download) from the command line."""
    from meritrun.storage import fetch_path, open_storage, split_uri

    base_dir = fetch_path(args.base, workdir / "base", endpoint=args.endpoint)
    candidates, verified, taken = [], set(), set()
    for i, uri in enumerate(uris):
        root, key = split_uri(uri)
        if root.startswith("s3://"):
            name = _name_of(Path(key), taken)
            storage = open_storage(root, endpoint=args.endpoint)
            candidate, checked = fetch_partition(storage, name, key, workdir / f"p{i}")
        else:  # a local artifact dir is read in place, its hashes checked by verification
            path = fetch_path(uri, workdir)
            if not (path / MANIFEST_NAME).is_file() and (path.parent / MANIFEST_NAME).is_file():
                path = path.parent  # the model/ dir of an artifact (what recipes name)
            name, checked = _name_of(path, taken), False
            try:
                candidate = (load_partition(path, name) if (path / MANIFEST_NAME).is_file()
                             else plain_source(path, name))
            except ContributionRejected as rejection:
                candidate = rejection
        candidates.append(candidate)
        if checked:
            verified.add(name)
    return base_dir, candidates, frozenset(verified)


def format_table(report: dict) -> str:
    rows = [("partition", "tokens", "weight", "status", "reason")]
    for p in report["partitions"]:
        weight = "-" if p["weight"] is None else f"{p['weight']:.4f}"
        reason = f"{p['check']}: {p['detail']}" if p["check"] else (
            "outlier (flagged)" if p["outlier"] else "")
        rows.append((p["name"], str(p["tokens"] or "-"), weight, p["status"], reason[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                     for r in rows)


def _check_numbers(args: argparse.Namespace) -> None:
    """Quorum and outlier factor up front, by flag (the method's own parameters are checked
    by its Params, by name)."""
    if not (math.isfinite(args.quorum) and 0 < args.quorum <= 1):
        raise SpecError(f"must be in (0, 1], got {args.quorum}", path="--quorum")
    if not (math.isfinite(args.outlier_factor) and args.outlier_factor > 1):
        raise SpecError(f"must be a finite number > 1, got {args.outlier_factor}",
                        path="--outlier-factor")


def _plan(args) -> tuple[str, dict, list[str], list[float] | None]:
    """(method, params, partition URIs, explicit weights) from --recipe or the flags."""
    values = {k: getattr(args, k) for k in _PARAM_FLAGS}
    if args.recipe is None:
        if not args.partitions or not args.base:
            raise SpecError("give PARTITION... and --base, or --recipe mergekit.yaml",
                            path="merge")
        method = get_method(args.method or "token-weighted")
        return method.key, dataclasses.asdict(method.parse_params(values)), args.partitions, None
    if args.partitions or args.method or any(v is not None for v in values.values()):
        raise SpecError("--recipe names the models, the method and its parameters: give no "
                        "PARTITION, --method or method flags with it", path="merge")
    plan: RecipePlan = recipe_plan(args.recipe)
    args.base = args.base or plan.base
    if not args.base:
        raise SpecError(f"{args.recipe} names no base_model: give --base", path="merge")
    args.dtype = args.dtype or plan.dtype
    method = get_method(plan.method)
    return (method.key, dataclasses.asdict(method.parse_params(plan.params)), plan.models,
            plan.weights)


def _weighted(candidates: list, weights: list[float] | None) -> list:
    """A recipe's linear weights replace the token counts (both are normalised the same way)."""
    if weights is None:
        return candidates
    return [dataclasses.replace(c, tokens=w) if isinstance(c, PartitionSource) else c
            for c, w in zip(candidates, weights, strict=True)]


def _tensors_only(candidates: list) -> list[str]:
    return [c.name for c in candidates if isinstance(c, PartitionSource) and c.manifest is None]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_numbers(args)
        key, params, uris, weights = _plan(args)
        settings = MergeSettings(
            method=key, params=params, quorum=args.quorum,
            outlier_factor=args.outlier_factor, refuse_outliers=args.refuse_outliers,
            shard_size_bytes=args.shard_size_mb * MB, output_dtype=args.dtype,
            device=args.device)
        with tempfile.TemporaryDirectory(prefix="meritrun-merge-") as tmp:
            workdir = args.workdir or Path(tmp)
            base_dir, candidates, verified = _gather(args, workdir, uris)
            candidates = _weighted(candidates, weights)
            plain = _tensors_only(candidates)
            method = get_method(key)
            if plain and method.uses_token_weights and weights is None:
                raise SpecError(f"{', '.join(plain)}: plain model directories carry no token "
                                f"counts, which {key} weights by: use --method uniform, or a "
                                "mergekit recipe with linear weights", path="merge")
            if plain:
                print(f"note: {', '.join(plain)} have no manifest.json: verification checks "
                      "only tensor names, shapes, dtypes and finiteness (no hashes, base "
                      "fingerprint or token counts)")
            held_out = (fetch_held_out(args.held_out, workdir, endpoint=args.endpoint)
                        if args.held_out else None)
            outcome = run_merge_job(base_dir=base_dir, candidates=candidates, settings=settings,
                                    out_dir=args.out, base_uri=args.base,
                                    hashes_verified=verified, held_out=held_out)
    except QuorumNotMet as e:
        report_path = args.out / "merge_report.json"
        if report_path.is_file():
            print(format_table(json.loads(report_path.read_text())))
        print(f"error: {e}", file=sys.stderr)
        return 3
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = outcome.report
    print(format_table(report))
    print(f"\nmethod {report['method']}  merged {len(report['included'])}/"
          f"{report['quorum']['total']} partitions in {report['timings']['total']:.1f} s")
    if report.get("evaluation", {}).get("models"):
        from meritrun.report import format_scoreboard

        print("\n" + format_scoreboard(report["evaluation"]))
    mergekit = report.get("mergekit") or {}
    if mergekit.get("note"):
        print(f"mergekit: {mergekit['note']}")
    print(f"model:  {outcome.model_dir}  (card: {outcome.model_dir / 'README.md'})\n"
          f"report: {outcome.report_path}")
    return 0


def fetch_held_out(uri: str, workdir: Path, *, endpoint: str | None) -> Path:
    from meritrun.storage import fetch_path

    return Path(fetch_path(uri, workdir / "held-out", endpoint=endpoint))
