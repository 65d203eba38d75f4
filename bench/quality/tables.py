"""Markdown tables of the report, and the mean +- spread arithmetic behind them (pure).

Spread is the sample standard deviation over seeds (ddof = 1); with one seed there is none
and the cell shows the mean alone. Accuracies are printed in percent, losses in nats/token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation or None for fewer than two values)."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt_ms(values: Sequence[float], *, scale: float = 1.0, digits: int = 1) -> str:
    """'54.3 ± 0.4' (scaled), or '54.3' for a single value."""
    mean, spread = mean_spread(values)
    text = f"{mean * scale:.{digits}f}"
    return text if spread is None else f"{text} ± {spread * scale:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    def align(i: int) -> str:
        cells = [row[i] for row in rows if str(row[i]) != "-"]
        numeric = bool(cells) and all(isinstance(c, int | float) or _numeric(c) for c in cells)
        return "---:" if numeric else "---"

    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(align(i) for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(text: object) -> bool:
    head = str(text).split(" ")[0].replace("%", "").replace("x", "")
    try:
        float(head)
    except ValueError:
        return False
    return True


def macro(scores: Mapping[str, Mapping[str, float]], names: Sequence[str], key: str) -> float:
    return sum(scores[n][key] for n in names) / len(names)


def merit_rows(results: Sequence[dict], *, arms: Sequence[str], sources: Sequence[str],
               conflict: Sequence[str], budget: int) -> list[list[str]]:
    """One row per arm: K, tokens / budget, accuracy (all, conflict, other), loss."""
    other = [s for s in sources if s not in set(conflict)]
    rows = []
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        ks = sorted({len(r["partitions"]) for r in runs})
        tokens = [sum(r["tokens"]) / budget for r in runs]
        rows.append([
            arm, "/".join(map(str, ks)), f"{sum(tokens) / len(tokens):.2f}x", len(runs),
            fmt_ms([macro(r["scores"], sources, "accuracy") for r in runs], scale=100),
            fmt_ms([macro(r["scores"], other, "accuracy") for r in runs], scale=100),
            fmt_ms([macro(r["scores"], conflict, "accuracy") for r in runs], scale=100),
            fmt_ms([macro(r["scores"], sources, "loss") for r in runs], digits=4),
        ])
    return rows


MERIT_HEADERS = ["arm", "K", "tokens", "seeds", "accuracy % (all)", "accuracy % (no-conflict)",
                 "accuracy % (conflict families)", "held-out loss"]

