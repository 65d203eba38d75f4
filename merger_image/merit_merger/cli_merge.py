"""`meritrun merge`: merge partition artifacts on one machine, with the stage's checks.

    meritrun merge --method ota --base BASE_DIR --out OUT_DIR PART_DIR_OR_URI... [options]

Partitions are artifact dirs (manifest.json + model/ ...), or file:// / s3:// URIs of one
(downloaded and sha256-verified on the way). Runs the same job as the merge stage (verify,
quorum, merge, report) and prints a table of partitions with tokens, weights and status.
Exit codes: 0 merged, 2 error, 3 quorum not met. Printing lives here and nowhere else.
"""

from __future__ import annotations

import argparse
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
from .verification import QuorumNotMet

_PARAM_FLAGS = ("density", "power", "epsilon", "scale")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, prog="meritrun merge",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("partitions", nargs="+", help="partition artifact dirs or file:// / s3:// URIs")
    p.add_argument("--method", default="token-weighted",
                   help=f"one of {', '.join(sorted(METHODS))} (camelCase spec names too)")
    p.add_argument("--base", required=True, help="base model dir (or URI)")
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


def _gather(args, workdir: Path):
    """(base dir, candidates, names verified on download) from the command line."""
    from meritrun.storage import fetch_path, open_storage, split_uri

    base_dir = fetch_path(args.base, workdir / "base", endpoint=args.endpoint)
    candidates, verified, taken = [], set(), set()
    for i, uri in enumerate(args.partitions):
        root, key = split_uri(uri)
        if root.startswith("s3://"):
            name = _name_of(Path(key), taken)
            storage = open_storage(root, endpoint=args.endpoint)
            candidate, checked = fetch_partition(storage, name, key, workdir / f"p{i}")
        else:  # a local artifact dir is read in place, its hashes checked by verification
            path = fetch_path(uri, workdir)
            name, checked = _name_of(path, taken), False
            try:
                candidate = load_partition(path, name)
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_numbers(args)
        method = get_method(args.method)
        values = {k: getattr(args, k) for k in _PARAM_FLAGS}
        params = method.parse_params(values)  # a flag the method does not take is an error
        import dataclasses

        settings = MergeSettings(
            method=method.key, params=dataclasses.asdict(params), quorum=args.quorum,
            outlier_factor=args.outlier_factor, refuse_outliers=args.refuse_outliers,
            shard_size_bytes=args.shard_size_mb * MB, output_dtype=args.dtype,
            device=args.device)
        with tempfile.TemporaryDirectory(prefix="meritrun-merge-") as tmp:
            workdir = args.workdir or Path(tmp)
            base_dir, candidates, verified = _gather(args, workdir)
            outcome = run_merge_job(base_dir=base_dir, candidates=candidates, settings=settings,
                                    out_dir=args.out, base_uri=args.base,
                                    hashes_verified=verified)
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
    print(f"model:  {outcome.model_dir}\nreport: {outcome.report_path}")
    return 0
