"""Presenting a mixture search: the ranking table and the plot.

Both read the JSON form of a result (`SearchResult.to_dict()`, i.e. search.json), so a saved
search can be re-rendered without re-running it. The plot's shape follows the number of
experts: a line over w1 for 2, a ternary scatter coloured by the objective for 3, a bar chart
of the top candidates beyond that. matplotlib is imported inside (Agg backend, no display).
"""

from __future__ import annotations

import math
from pathlib import Path

TOP_BARS = 15


def weights_label(weights: dict[str, float]) -> str:
    return " ".join(f"{name}={w:.3f}" for name, w in weights.items())


def format_ranking_table(search: dict, *, top: int | None = None) -> str:
    """Rank, weights per expert, objective score, macro loss and accuracy; best first."""
    names = search["names"]
    rows = [("rank", *names, search["objective"], "mean_loss", "accuracy")]
    for entry in search["ranking"][:top]:
        acc = entry["accuracy"]
        rows.append((str(entry["rank"]), *(f"{entry['weights'][n]:.3f}" for n in names),
                     f"{entry['score']:.4f}", f"{entry['mean_loss']:.4f}",
                     "-" if acc is None else f"{acc:.3f}"))
    base = search.get("base")
    if base is not None:
        acc = base["macro"]["accuracy"]
        rows.append(("base", *("0" for _ in names), f"{base['score']:.4f}",
                     f"{base['macro']['mean_loss']:.4f}", "-" if acc is None else f"{acc:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def ternary_xy(w: tuple[float, float, float]) -> tuple[float, float]:
    """Barycentric -> 2-D: expert 1 at (0, 0), expert 2 at (1, 0), expert 3 at the apex."""
    total = sum(w)
    return (w[1] + w[2] / 2) / total, (w[2] * math.sqrt(3) / 2) / total


def plot_search(search: dict, path: Path) -> Path:
    """Write the search plot as PNG; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, ranking = search["names"], search["ranking"]
    better = "lower" if search["direction"] == "min" else "higher"
    label = f"{search['objective']} ({better} is better)"
    best = ranking[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if len(names) == 2:
        pts = sorted((e["weights"][names[0]], e["score"]) for e in ranking)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.plot([best["weights"][names[0]]], [best["score"]], marker="*", markersize=16,
                color="tab:red", linestyle="none", label="best")
        ax.set_xlabel(f"weight of {names[0]} (1 - weight of {names[1]})")
        ax.set_ylabel(label)
        ax.legend()
    elif len(names) == 3:
        xy = [ternary_xy(tuple(e["weights"][n] for n in names)) for e in ranking]
        cmap = "viridis_r" if search["direction"] == "min" else "viridis"
        sc = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=[e["score"] for e in ranking],
                        cmap=cmap, s=140, edgecolors="k")
        ax.scatter([xy[0][0]], [xy[0][1]], marker="*", s=320, color="tab:red", label="best")
        h = math.sqrt(3) / 2
        ax.plot([0, 1, 0.5, 0], [0, 0, h, 0], color="gray", linewidth=1)
        for (x, y), n in zip([(0, 0), (1, 0), (0.5, h)], names, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(0, -14 if y == 0 else 6),
                        ha="center")
        fig.colorbar(sc, ax=ax, label=label)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.legend(loc="upper right")
    else:
        top = ranking[:TOP_BARS]
        ax.barh(range(len(top)), [e["score"] for e in top], color="tab:blue")
        ax.set_yticks(range(len(top)), [weights_label(e["weights"]) for e in top], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    ax.set_title(f"mixture search: {len(ranking)} candidates")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
