"""The "did it help?" table: held-out loss (and accuracy) per source, one column per model.

The merge report's `evaluation` section (base, each partition, merged), `meritrun compare`,
the end of `meritrun run` and the demo's closing report (plus the joint baseline, as
report.json and report.png) all print it with `format_report_table`. Presentation only, and
torch-free so the core CLI can print a merge report's table; the scoring is
merit_merger.scoreboard, the same code the mixture search uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .api import MeritRunStatus


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    loss, acc = row.get("mean_loss"), row.get("accuracy")
    text = "-" if loss is None else f"{loss:.3f}"
    return text + (f" ({acc:.2f})" if acc is not None else "")


def format_report_table(models: dict[str, dict], sources: list[str]) -> str:
    """Rows: sources then the macro mean; columns: models; cells: loss (accuracy).

    Lower loss is better, higher accuracy is better; a model not scored on a source shows "-".
    """
    names = list(models)
    width = max(16, *(len(n) + 2 for n in names))
    label = max(20, *(len(s) + 2 for s in sources))
    lines = [f"{'held-out loss (acc)':<{label}}" + "".join(f"{n:>{width}}" for n in names)]
    for src in [*sources, "mean"]:
        cells = [_cell(models[n].get("macro") if src == "mean"
                       else models[n].get("sources", {}).get(src)) for n in names]
        lines.append(f"{src:<{label}}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def format_scoreboard(evaluation: dict) -> str:
    """The table of a scoreboard (a merge report's `evaluation`, `meritrun compare --json`)."""
    return format_report_table(evaluation["models"], list(evaluation["sources"]))


def merge_report_uri(model_uri: str) -> str:
    """merge_report.json beside a merged model (`.../merged/attempt-N/model`)."""
    return model_uri.rstrip("/").removesuffix("/model") + "/merge_report.json"


def read_merge_scores(model_uri: str, cache: Path, *, endpoint: str | None = None,
                      region: str | None = None) -> dict | None:
    """The merge report's `evaluation` (the scoreboard), or None when it has none."""
    from .errors import MeritRunError
    from .storage import fetch_path

    try:
        path = fetch_path(merge_report_uri(model_uri), cache, endpoint=endpoint, region=region)
        evaluation = json.loads(Path(path).read_text()).get("evaluation")
    except (MeritRunError, OSError, ValueError):
        return None
    return evaluation if evaluation and evaluation.get("models") else None


def plot_report(models: dict[str, dict], sources: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(sources), 3.6))
    width = 0.8 / len(models)
    for i, (name, res) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(sources))]
        losses = [(res["sources"].get(s) or {}).get("mean_loss") for s in sources]
        ax.bar(xs, [math.nan if v is None else v for v in losses], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Per-source held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_report(workdir: Path, status: MeritRunStatus, *, held_out: Path,
                      joint_uri: str | None = None) -> dict:
    """report.json, report.png and the printed table: the merge report's scores (base, each
    partition, merged) plus the joint baseline, scored the same way."""
    from merit_merger.scoreboard import score_models

    from .storage import fetch_path

    cache = workdir / "run" / "cache"
    evaluation = read_merge_scores(status.model_uri, cache) if status.model_uri else None
    if evaluation is None:  # a merge without held-out scores: score everything here
        candidates = {"base": workdir / "base"}
        for p in status.partitions:
            if p.artifact is not None:
                candidates[p.name] = fetch_path(p.artifact.uri, cache) / "model"
        if status.model_uri:
            candidates["merged"] = fetch_path(status.model_uri, cache)
        evaluation = score_models(candidates, held_out)
    models, joint_tokens = dict(evaluation["models"]), None
    if joint_uri is not None:
        from .artifacts import read_manifest

        joint = fetch_path(joint_uri, cache)
        joint_tokens = read_manifest(joint).tokens.supervised
        extra = score_models({"joint": joint / "model"}, held_out,
                             max_new_tokens=evaluation.get("maxNewTokens"))
        models["joint"] = extra["models"]["joint"]
    sources = list(evaluation["sources"])
    report = {"run": "demo", "phase": status.phase, "model_uri": status.model_uri,
              "joint_uri": joint_uri, "joint_tokens": joint_tokens,
              "partitions": [{"name": p.name, "sources": p.sources, "tokens": p.tokens}
                             for p in status.partitions],
              "plan": status.plan.to_wire() if status.plan else None, "models": models}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(models, sources, workdir / "report.png")
    print(format_report_table(models, sources))
    if joint_tokens is not None:
        split = " + ".join(str(p.tokens) for p in status.partitions if p.tokens)
        print(f"joint: one model trained on the whole mixture, {joint_tokens} supervised tokens "
              f"(the partitions': {split}); the baseline MERIT claims to approach")
    print(f"report: {workdir / 'report.json'}  picture: {workdir / 'report.png'}")
    return report
