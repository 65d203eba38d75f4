"""`meritrun profile`: profile a local mixture against a local base model, no cluster needed.

Runs the same code as the profile stage (`profile_to_dir`) and writes the same files into
--out, then prints the partitions and the explained variance. This is the presentation layer,
so it prints; errors become a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meritrun.api import PartitioningSpec, ProfilingSpec
from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.data import group_by_source, iter_examples
from meritrun.errors import MeritRunError
from meritrun.stages import Plan

from .stage import profile_to_dir

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, 
        prog="meritrun profile",
        description="Measure gradient conflicts between the sources of a mixture and split it "
                    "into 2^R partitions along the main conflict axes (MERIT).",
    )
    p.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    p.add_argument("--data", required=True, type=Path, help="JSONL mixture with a source field")
    p.add_argument("--axes", required=True, type=int, help="PCA axes R (K = 2^R partitions)")
    p.add_argument("--out", type=Path, default=Path("profile"), help="output folder")
    p.add_argument("--samples", type=int, default=200, help="calibration examples per source")
    p.add_argument("--stride", type=int, default=5, help="take every S-th example first")
    p.add_argument("--dim", type=int, default=8192, help="sketch dimension")
    p.add_argument("--parameters", default="attention", help="attention, all, or a regex")
    p.add_argument("--uncentered", action="store_true", help="PCA on C without double-centring")
    p.add_argument("--seed", type=int, default=0, help="calibration, projection and split seed")
    p.add_argument("--micro-batch", type=int, default=8, help="examples per backward pass")
    p.add_argument("--source-field", default="source", help="field naming an example's source")
    return p


def format_plan(plan: Plan) -> str:
    """The table printed after a profile: partition, tokens, sources; then the axes."""
    width = max([len(p.name) for p in plan.partitions] + [9])
    lines = [f"{'partition':<{width}}  {'tokens':>10}  sources"]
    for p in plan.partitions:
        lines.append(f"{p.name:<{width}}  {p.tokens:>10}  {', '.join(p.sources)}")
    for i, share in enumerate(plan.explained_variance or []):
        lines.append(f"axis {i + 1}: {100 * share:.1f}% of variance explained")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        profiling = ProfilingSpec(
            calibration_samples=args.samples, stride=args.stride, projection_dim=args.dim,
            parameters=args.parameters, centered=not args.uncentered, seed=args.seed,
            micro_batch_size=args.micro_batch,
        )
        partitioning = PartitioningSpec(strategy="conflictPCA", axes=args.axes, seed=args.seed)
        examples = group_by_source(iter_examples(args.data, source_field=args.source_field))
        plan = profile_to_dir(examples, args.base, args.out, profiling=profiling,
                              partitioning=partitioning)
    except (MeritRunError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"meritrun profile: {e}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    print(f"wrote {args.out}/plan.json, conflict.npy, sketch.npy, conflict.png, pca.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
