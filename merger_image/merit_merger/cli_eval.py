"""`meritrun eval MODEL_DIR --data FILE.jsonl`: the per-source held-out table of one model.

Presentation only: argument parsing, printing and the optional JSON file; the numbers come from
`merit_merger.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.errors import MeritRunError

from .evaluation import evaluate_dir, format_eval_table, json_safe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, prog="meritrun eval",
                                description="Held-out loss, perplexity and exact match per source.")
    p.add_argument("model_dir", type=Path, help="Hugging Face model directory")
    p.add_argument("--data", required=True, type=Path, help="held-out JSONL")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-generate", action="store_true",
                   help="skip greedy generation (loss and perplexity only)")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the result as JSON")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        print(f"error: {args.model_dir}: not a Hugging Face model directory (no config.json)",
              file=sys.stderr)
        return 2
    try:
        result = evaluate_dir(args.model_dir, args.data, batch_size=args.batch_size,
                              max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens,
                              generate=not args.no_generate)
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_eval_table(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"model": str(args.model_dir), "data": str(args.data),
               **result.to_dict(include_predictions=True)}
        args.json_out.write_text(json.dumps(json_safe(doc), indent=2))
        print(f"wrote {args.json_out}")
    return 0
