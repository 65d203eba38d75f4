"""The two pictures of a profile: the conflict heatmap and the sources on the first PCA axes.

Presentation only (matplotlib, Agg backend, files out): nothing here feeds back into the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_conflict(
    path: Path, matrix: np.ndarray, names: Sequence[str], partitions: Sequence[Sequence[str]],
    *, centered: bool,
) -> Path:
    """Heatmap of C with sources grouped by partition and the partition boundaries drawn."""
    plt = _pyplot()
    order = [s for part in partitions for s in part]
    index = [list(names).index(s) for s in order]
    c = matrix[np.ix_(index, index)]
    size = max(4.0, 0.35 * len(order) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine of source gradients")
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    edge = -0.5
    for part in partitions[:-1]:
        edge += len(part)
        ax.axhline(edge, color="black", linewidth=1.5)
        ax.axvline(edge, color="black", linewidth=1.5)
    ax.set_title(f"Gradient conflict, {len(partitions)} partitions "
                 f"(PCA on {'double-centred' if centered else 'uncentred'} C)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pca(
    path: Path, scores: Mapping[str, Sequence[float]], partitions: Sequence[Sequence[str]],
    explained: Sequence[float],
) -> Path:
    """Sources on axes 1 and 2 (axis 2 = 0 when only one exists), coloured by partition."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(partitions) <= 10 else "tab20")
    for k, part in enumerate(partitions):
        xs = [scores[s][0] for s in part]
        ys = [scores[s][1] if len(scores[s]) > 1 else 0.0 for s in part]
        ax.scatter(xs, ys, color=colours(k % colours.N), label=f"p{k}", s=40)
        for s, x, y in zip(part, xs, ys, strict=True):
            ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    labels = [f"axis {i + 1} ({100 * v:.1f}% of variance)" for i, v in enumerate(explained[:2])]
    ax.set_xlabel(labels[0] if labels else "axis 1")
    ax.set_ylabel(labels[1] if len(labels) > 1 else "(no second axis)")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.legend(title="partition", fontsize=8)
    ax.set_title("Sources on the main conflict axes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
