"""The report's pictures: MERIT arms, OTA merges, proxy vs real mixtures, stage costs.

Presentation only (matplotlib Figure objects, no pyplot global state); the conflict heatmap
and PCA scatter come from the profiler's own `merit_trainer.profiling.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .tables import mean_spread


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_arms(path: Path, per_arm: Mapping[str, Sequence[float]], *, ylabel: str,
              title: str, reference: float | None = None) -> Path:
    """Bars: mean over seeds, error bars: sample std, dots: each seed."""
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    arms = list(per_arm)
    for i, arm in enumerate(arms):
        values = per_arm[arm]
        mean, spread = mean_spread(values)
        ax.bar(i, mean, yerr=spread or 0.0, capsize=4, color="tab:blue" if "merit" in arm
               else "tab:gray", alpha=0.8)
        ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
    if reference is not None:
        ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1, label="base")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    lows = [min(v) for v in per_arm.values()] + ([reference] if reference is not None else [])
    highs = [max(v) for v in per_arm.values()] + ([reference] if reference is not None else [])
    pad = (max(highs) - min(lows)) * 0.5 or 0.01
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_merges(path: Path, labels: Sequence[str], accuracy: Sequence[float],
                kept: Sequence[float]) -> Path:
    """Horizontal bars: mean accuracy and mean kept fraction of expert accuracy per merge."""
    fig = _figure(7.5, 0.32 * len(labels) + 1.5)
    ax = fig.add_subplot()
    ys = range(len(labels))
    ax.barh([y + 0.2 for y in ys], accuracy, height=0.4, label="mean accuracy")
    ax.barh([y - 0.2 for y in ys], kept, height=0.4, label="kept / expert accuracy")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, max(kept, default=0) * 1.05))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2)
    ax.set_title("Merging one expert per family")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_search(path: Path, proxy: Sequence[float], real: Sequence[float], *, rho: float) -> Path:
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.scatter(proxy, real, s=20)
    ax.set_xlabel("proxy (merged) mean held-out loss")
    ax.set_ylabel("real mixture training mean held-out loss")
    ax.set_title(f"Mixture search: Spearman rho = {rho:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_cost(path: Path, stages: Mapping[str, float]) -> Path:
    fig = _figure(7, 0.3 * len(stages) + 1.5)
    ax = fig.add_subplot()
    names = list(stages)
    ax.barh(range(len(names)), [stages[n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title("Where the benchmark's time goes")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
