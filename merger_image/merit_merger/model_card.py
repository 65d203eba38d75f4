"""The merged model's card: README.md in the model directory, read where the model goes.

A merged model leaves the run (pushed to a hub, copied to a serving cluster) without its
merge_report.json, so the card carries what a reader needs to trust it: the base, the method
and its parameters, every partition with its sources, tokens and weight (and the refused ones
with the reason), the held-out scores when the run had a held-out set, and how to reproduce
the merge with mergekit. Built from the report only, so it never disagrees with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meritrun.report import format_scoreboard

CARD_NAME = "README.md"


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def render_model_card(report: Mapping[str, Any], *, run: str | None = None) -> str:
    """Markdown (with the Hugging Face card's YAML header) from a merge report."""
    base = report.get("base") or {}
    params = report.get("parameters") or {}
    title = f"Merged model of MeritRun `{run}`" if run else "Merged model (MeritRun)"
    lines = [
        "---", "library_name: transformers", "tags: [meritrun, merge]",
        *([f"base_model: {base['uri']}"] if base.get("uri") else []), "---", "",
        f"# {title}", "",
        f"Merged with MeritRun from {len(report.get('included') or [])} of "
        f"{(report.get('quorum') or {}).get('total', '?')} partitions, each trained from the "
        "same base on its own sources with no communication between them.", "",
        f"- base: `{base.get('uri', '?')}` (fingerprint `{base.get('fingerprint', '?')}`)",
        f"- method: `{report.get('method')}` (spec name `{report.get('spec_name')}`)"
        + (", parameters: " + ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
           if any(v is not None for v in params.values()) else ""),
        "- weights: " + ("token-weighted (supervised tokens)" if report.get("token_weighted")
                         else "as the method defines"),
        "", "## Partitions", "",
        "| partition | sources | supervised tokens | weight | status |",
        "|---|---|---:|---:|---|",
    ]
    for p in report.get("partitions") or []:
        status = p["status"] + (f" ({p['check']}: {p['detail']})" if p.get("check") else "")
        if p.get("verified") == "tensors-only":
            status += "; no manifest: tensors checked only"
        lines.append(f"| {p['name']} | {', '.join(p.get('sources') or []) or '-'} | "
                     f"{_fmt(p.get('tokens'))} | {_fmt(p.get('weight'), '.4f')} | {status} |")
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("models"):
        lines += ["", "## Held-out scores", "",
                  f"Mean loss per supervised token (lower is better) and exact-match accuracy "
                  f"in parentheses, on `{evaluation.get('heldOut')}`:", "", "```",
                  format_scoreboard(evaluation), "```"]
    elif evaluation and evaluation.get("error"):
        lines += ["", "## Held-out scores", "", f"Not scored: {evaluation['error']}"]
    mergekit = report.get("mergekit") or {}
    lines += ["", "## Reproduce", ""]
    if mergekit.get("recipe") and mergekit.get("exact", True):
        lines.append(f"`mergekit-yaml {mergekit['recipe']} OUT_DIR` (beside merge_report.json) "
                     f"runs the same merge with mergekit's `{mergekit.get('method')}`.")
    else:
        lines.append(mergekit.get("note") or "No mergekit recipe was written.")
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: Path, report: Mapping[str, Any], *,
                     run: str | None = None) -> Path:
    path = Path(model_dir) / CARD_NAME
    path.write_text(render_model_card(report, run=run))
    return path
