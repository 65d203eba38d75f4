"""`meritrun eval` and `meritrun compare`: held-out scores of one or several models.

    meritrun eval MODEL --data FILE.jsonl             one model: loss, perplexity, accuracy
    meritrun compare [NAME=]MODEL... --data FILE      several: the "did it help?" table
    meritrun eval MODEL MODEL... --data FILE          the same as compare

A MODEL is a Hugging Face model directory, a partition artifact (manifest.json + model/), or
a URI of either: `file://...` (what `meritrun run` prints as the merged model) or `s3://...`
(downloaded, with --endpoint). A LoRA adapter needs --base. Presentation only: argument
parsing, printing and the optional JSON file; the numbers come from `merit_merger.evaluation`
and `merit_merger.scoreboard`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from meritrun.artifacts import MANIFEST_NAME, read_manifest
from meritrun.clihelp import DefaultsHelpFormatter
from meritrun.errors import DataError, MeritRunError

from .evaluation import evaluate_dir, format_eval_table, json_safe

_GENERIC = re.compile(r"^(model|attempt-\d+|artifact)$")


def build_parser(prog: str = "meritrun eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Held-out loss, perplexity and exact match per source, for one "
        "model or several side by side.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL",
                   help="model dir, partition artifact dir, or file:// / s3:// URI of one")
    p.add_argument("--data", required=True, help="held-out JSONL (path or URI)")
    p.add_argument("--base", help="base model (dir or URI), for LoRA adapters")
    p.add_argument("--endpoint", help="S3 endpoint for s3:// URIs")
    p.add_argument("--cache", type=Path, help="download dir for URIs (default: a temp dir)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--max-seq-len", type=int, default=512,
                   help="truncate examples to this many tokens (as training does)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per answer (default: the longest reference answer)")
    p.add_argument("--no-generate", action="store_true",
                   help="skip greedy generation (loss and perplexity only)")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the result as JSON")
    return p


def default_name(uri: str) -> str:
    """`.../runs/demo/merged/attempt-1/model` -> `merged`; `.../p0/attempt-2` -> `p0`."""
    parts = [p for p in re.split(r"[/\\]+", uri.rstrip("/")) if p]
    meaningful = [p for p in parts if not _GENERIC.match(p)]
    return meaningful[-1] if meaningful else (parts[-1] if parts else "model")


def named_models(args: list[str]) -> dict[str, str]:
    """NAME=URI pairs (the name defaults to the path's meaningful part), names made unique."""
    out: dict[str, str] = {}
    for arg in args:
        name, sep, uri = arg.partition("=")
        if not sep or "/" in name or ":" in name:
            name, uri = default_name(arg), arg
        base, i = name, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out[name] = uri
    return out


def resolve_model(uri: str, cache: Path, *, endpoint: str | None = None) -> Path:
    """The local model directory a MODEL argument names (downloading a URI if needed)."""
    from meritrun.storage import fetch_path

    path = Path(fetch_path(uri, cache, endpoint=endpoint))
    if (path / MANIFEST_NAME).is_file():
        path = path / read_manifest(path).model_dir
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise DataError(f"{uri}: not a Hugging Face model directory (no config.json) nor a "
                        f"partition artifact (no {MANIFEST_NAME})")
    return path


def _one(args, model_dir: Path, data: Path) -> dict:
    result = evaluate_dir(model_dir, data, batch_size=args.batch_size,
                          max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens or 32,
                          generate=not args.no_generate)
    print(format_eval_table(result))
    return {"model": str(model_dir), "data": str(data),
            **result.to_dict(include_predictions=True)}


def _several(args, refs: dict, data: Path) -> dict:
    from meritrun.report import format_scoreboard

    from .scoreboard import score_models

    evaluation = score_models(refs, data, max_seq_len=args.max_seq_len,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              generate=not args.no_generate)
    print(format_scoreboard(evaluation))
    print("cells: mean loss per supervised token (lower is better) and, in parentheses, "
          "exact-match accuracy")
    return evaluation


def run(argv: list[str], *, prog: str, compare: bool) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="meritrun-eval-") as tmp:
            from meritrun.storage import fetch_path

            from .scoreboard import ModelRef

            cache = args.cache or Path(tmp)
            data = Path(fetch_path(args.data, cache / "data", endpoint=args.endpoint))
            base = (resolve_model(args.base, cache / "base", endpoint=args.endpoint)
                    if args.base else None)
            uris = named_models(args.models)
            refs = {name: ModelRef(resolve_model(uri, cache / f"m{i}", endpoint=args.endpoint),
                                   base) for i, (name, uri) in enumerate(uris.items())}
            if len(refs) == 1 and not compare and not (refs[next(iter(refs))].path /
                                                       "adapter_config.json").is_file():
                doc = _one(args, next(iter(refs.values())).path, data)
            else:
                doc = _several(args, refs, data)
                doc["uris"] = uris
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(json_safe(doc), indent=2))
        print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str]) -> int:
    return run(argv, prog="meritrun eval", compare=False)


def compare_main(argv: list[str]) -> int:
    return run(argv, prog="meritrun compare", compare=True)
