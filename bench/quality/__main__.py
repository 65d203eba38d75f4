"""`python -m bench.quality [--quick] [--report-only]`: run the quality benchmark.

CLI presentation layer (prints progress). Writes bench/results/quality/{report.md,
results.json, *.png}; trained models stay under bench/results/quality/work-*/ so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "results" / "quality"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (< 10 min)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report.md and plots from results.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("MERITRUN_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    # Two threads help the full run's 9M model; the quick run's 0.56M one only spins the second
    # (it runs beside other tests in CI).
    torch.set_num_threads(1 if args.quick else 2)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from .config import FULL, QUICK
    from .report import write_report
    from .run import run_benchmark

    out = args.out / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        results = run_benchmark(QUICK if args.quick else FULL, out=out,
                                mode="quick" if args.quick else "full")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = write_report(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
