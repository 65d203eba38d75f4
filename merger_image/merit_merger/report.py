"""merge_report.json and its plot: what was merged, what was refused and why, and how it went.

The report is the one record of a merge a person (or the operator) reads: method and
parameters, per-partition tokens, weights and status (with the refusing check), outliers,
per-tensor and per-layer statistics (update norm of every expert; FFG: the fraction of
elements each expert's mask kept), timings and bytes moved. It is written for failed merges
too (quorum not met), so refusals are never silent. This module formats; it merges nothing.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meritrun.errors import ContributionRejected

from .engine import MergeResult
from .methods import MergeMethod
from .sources import PartitionSource
from .verification import Verification

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
PLOT_NAME = "merge_layers.png"
REPORT_FORMAT = "meritrun.merge-report/v1"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(tensor: str) -> str:
    """Group key of a tensor: `layer 007`, `embed`, `head`, or `other` (sorts sensibly)."""
    m = _LAYER.search(tensor)
    if m:
        return f"layer {int(m.group(1)):03d}"
    if "embed" in tensor or "wte" in tensor or "wpe" in tensor:
        return "embed"
    if "lm_head" in tensor:
        return "head"
    return "other"


def _layer_order(layer: str) -> tuple[int, str]:
    return ({"embed": 0, "other": 2, "head": 3}.get(layer, 1), layer)


def layer_table(tensor_norms: Mapping[str, Mapping[str, float]],
                tensor_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layer: update norm per expert (root of summed squares) and FFG kept fraction."""
    sq: dict[str, dict[str, float]] = {}
    kept: dict[str, dict[str, float]] = {}
    numel: dict[str, int] = {}
    for tensor, per in tensor_norms.items():
        bucket = sq.setdefault(layer_of(tensor), {})
        for p, n in per.items():
            bucket[p] = bucket.get(p, 0.0) + n * n
    for tensor, stats in tensor_stats.items():
        if "kept_fraction" not in stats:
            continue
        layer = layer_of(tensor)
        numel[layer] = numel.get(layer, 0) + stats["numel"]
        bucket = kept.setdefault(layer, {})
        for p, f in stats["kept_fraction"].items():
            bucket[p] = bucket.get(p, 0.0) + f * stats["numel"]
    table: dict[str, dict[str, Any]] = {}
    for layer in sorted(set(sq) | set(kept), key=_layer_order):
        row: dict[str, Any] = {}
        if layer in sq:
            row["update_norm"] = {p: math.sqrt(v) for p, v in sq[layer].items()}
        if layer in kept:
            row["kept_fraction"] = {p: v / numel[layer] for p, v in kept[layer].items()}
        table[layer] = row
    return table


def build_report(
    *, method: MergeMethod, params: Mapping[str, Any], candidates: Sequence[str],
    sources: Mapping[str, PartitionSource], refused: Sequence[ContributionRejected],
    verification: Verification | None, result: MergeResult | None, quorum: float,
    status: str, reason: str | None = None, timings: Mapping[str, float] | None = None,
    base: Mapping[str, Any] | None = None, mergekit: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (NaN/inf become null)."""
    refusal = {r.partition: r for r in refused}
    outliers = {f.partition: f for f in (verification.outliers if verification else [])}
    norms = verification.update_norms if verification else {}
    weights = result.weights if result and method.uses_token_weights else {}
    parts = []
    for name in candidates:
        src, r, flag = sources.get(name), refusal.get(name), outliers.get(name)
        manifest = src.manifest if src else None
        parts.append({
            "name": name, "tokens": src.tokens if src else None,
            "sources": list(manifest.sources) if manifest else None,
            # without a manifest (a plain HF directory) only the tensors could be checked
            "verified": None if src is None else ("artifact" if manifest else "tensors-only"),
            "weights": src.weights if src else None,
            "status": "refused" if r else ("included" if result else "not-merged"),
            "check": r.check if r else None, "detail": r.detail if r else None,
            "weight": weights.get(name), "update_norm": norms.get(name),
            "outlier": bool(flag), "outlier_ratio": flag.ratio if flag else None,
            "ffg_threshold": (result.thresholds or {}).get(name) if result else None,
        })
    tensor_norms = verification.tensor_norms if verification else {}
    tensor_stats = result.tensor_stats if result else {}
    tensors = {}
    for t in sorted(set(tensor_norms) | set(tensor_stats)):
        tensors[t] = dict(tensor_stats.get(t, {}))
        if t in tensor_norms:
            tensors[t]["update_norm"] = dict(tensor_norms[t])
    report = {
        "format": REPORT_FORMAT, "status": status, "reason": reason,
        "method": method.key, "spec_name": method.spec_name, "parameters": dict(params),
        "token_weighted": method.uses_token_weights, "base": dict(base or {}),
        "quorum": {"required": quorum, "total": len(candidates),
                   "passed": len(candidates) - len(refusal), "met": result is not None},
        "partitions": parts,
        "included": [p["name"] for p in parts if p["status"] == "included"],
        "refused": [{"partition": r.partition, "check": r.check, "detail": r.detail}
                    for r in refused],
        "outliers": [{"partition": f.partition, "norm": f.norm, "median_others": f.median_others,
                      "ratio": f.ratio, "refused": f.refused} for f in outliers.values()],
        "layers": layer_table(tensor_norms, tensor_stats),
        "tensors": tensors,
        "timings": dict(timings or {}),
        "io": _io(result),
        "mergekit": dict(mergekit or {}),
        "output": dict(output or {}),
    }
    if evaluation is not None:
        report["evaluation"] = dict(evaluation)
    return _json_safe(report)


def _io(result: MergeResult | None) -> dict[str, Any]:
    if result is None:
        return {}
    seconds = result.seconds.get("total") or math.nan
    return {"bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
            "read_gb_per_s": result.bytes_read / 1e9 / seconds,
            "output_dtype": result.output_dtype, "kernel": result.kernel,
            "files": [f.name for f in result.files]}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: Path, report: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))
    return path


def plot_layers(path: Path, report: Mapping[str, Any]) -> Path | None:
    """FFG kept fraction per layer per expert, else update norm per layer per expert."""
    layers = report.get("layers") or {}
    key = "kept_fraction" if any("kept_fraction" in r for r in layers.values()) else "update_norm"
    rows = [(layer, r[key]) for layer, r in layers.items() if key in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({p for _, per in rows for p in per})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows)), 4.0))
    for p in partitions:
        ax.plot(range(len(rows)), [per.get(p, math.nan) for _, per in rows], marker="o", label=p)
    ax.set_xticks(range(len(rows)), [layer for layer, _ in rows], rotation=60, fontsize=7)
    ax.set_ylabel("FFG mask kept fraction" if key == "kept_fraction" else "||theta_k - theta0||")
    ax.set_title(f"{report.get('method')}: {key.replace('_', ' ')} per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
