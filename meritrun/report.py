"""The demo's closing report: held-out loss (and accuracy) per source for the base, each
partition and the merged model, as report.json, a printed table and report.png.

Presentation only; the scoring is merit_merger.evaluation, the same code the merge report
and the mixture search use.
"""

from __future__ import annotations

import json
from pathlib import Path

from .api import MeritRunStatus


def format_report_table(models: dict[str, dict], sources: list[str]) -> str:
    """Rows: sources then the macro mean; columns: models; cells: loss (accuracy)."""
    names = list(models)
    width = max(16, *(len(n) + 2 for n in names))
    lines = [f"{'held-out loss (acc)':<20}" + "".join(f"{n:>{width}}" for n in names)]
    for src in [*sources, "mean"]:
        cells = []
        for n in names:
            row = models[n]["macro"] if src == "mean" else models[n]["sources"][src]
            acc = row.get("accuracy")
            cells.append(f"{row['mean_loss']:.3f}" + (f" ({acc:.2f})" if acc is not None else ""))
        lines.append(f"{src:<20}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def plot_report(models: dict[str, dict], sources: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(sources), 3.6))
    width = 0.8 / len(models)
    for i, (name, res) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(sources))]
        ax.bar(xs, [res["sources"][s]["mean_loss"] for s in sources], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Per-source held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_report(workdir: Path, status: MeritRunStatus, *, held_out: Path) -> dict:
    from merit_merger.evaluation import evaluate_dir

    from .storage import fetch_path

    cache = workdir / "run" / "cache"
    candidates = {"base": workdir / "base"}
    for p in status.partitions:
        if p.artifact is not None:
            candidates[p.name] = fetch_path(p.artifact.uri, cache) / "model"
    if status.model_uri:
        candidates["merged"] = fetch_path(status.model_uri, cache)
    models = {name: evaluate_dir(path, held_out, max_seq_len=64, max_new_tokens=16).to_dict()
              for name, path in candidates.items()}
    sources = list(models["base"]["sources"])
    report = {"run": "demo", "phase": status.phase, "model_uri": status.model_uri,
              "partitions": [{"name": p.name, "sources": p.sources, "tokens": p.tokens}
                             for p in status.partitions],
              "plan": status.plan.to_wire() if status.plan else None, "models": models}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(models, sources, workdir / "report.png")
    print(format_report_table(models, sources))
    print(f"report: {workdir / 'report.json'}  picture: {workdir / 'report.png'}")
    return report
