"""report.md and the plots from the results dict (presentation; no training, no merging).

Every number in the report comes from `results.json`, so the report can be rebuilt from it
without rerunning anything (`python -m bench.quality --report-only`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import plots
from .merit import ARMS
from .mixture import CUE, conflicting_pairs, new_convention_sources
from .ota import family_scores, kept_fraction
from .tables import MERIT_HEADERS, fmt_ms, macro, markdown_table, merit_rows

PAPER_MERIT = {"joint-1ep": 54.3, "joint-2ep": 54.7, "random-8": 54.5, "merit-2": 55.2,
               "merit-4": 55.7, "merit-8": 57.0}


def merit_section(res: dict) -> str:
    sources = [s for f in res["families"].values() for s in f]
    rows = merit_rows(res["merit"], arms=ARMS, sources=sources,
                      conflict=res["conflict_sources"], budget=res["budget"])
    for row in rows:
        row.append(f"{PAPER_MERIT[row[0]]:.1f}")
    base = res["base"]["scores"]
    other = [s for s in sources if s not in set(res["conflict_sources"])]
    rows.insert(0, ["base (no fine-tuning)", "-", "0", "-",
                    f"{100 * macro(base, sources, 'accuracy'):.1f}",
                    f"{100 * macro(base, other, 'accuracy'):.1f}",
                    f"{100 * macro(base, res['conflict_sources'], 'accuracy'):.1f}",
                    f"{macro(base, sources, 'loss'):.4f}", "-"])
    table = markdown_table(MERIT_HEADERS + ["paper (8-benchmark avg)"], rows)
    splits = []
    for r in res["merit"]:
        if r["seed"] == res["sizes"]["seeds"][0] and r["arm"] in ("merit-2", "merit-4",
                                                                   "merit-8", "random-8"):
            splits.append(f"- {r['arm']} (seed {r['seed']}): "
                          + " | ".join(", ".join(p) for p in r["partitions"]))
    separated = []
    for arm in ARMS:
        runs = [r for r in res["merit"] if r["arm"] == arm]
        if runs:
            fractions = [separated_pairs(r["partitions"]) for r in runs]
            separated.append(f"{arm} {100 * sum(fractions) / len(fractions):.0f}%")
    return ("## MERIT table\n\nMean over sources of held-out exact-match accuracy and supervised "
            "loss; mean ± sample std over seeds. `tokens` is the supervised-token budget relative "
            f"to one epoch of the mixture ({res['budget']} tokens).\n\n{table}\n\n"
            f"Conflicting source pairs (same format, the cue `{CUE}` flips the convention; "
            f"{len(conflicting_pairs())} pairs) that the split "
            "put in different partitions, mean over seeds: " + ", ".join(separated) + ".\n\n"
            "Partitions (first seed):\n\n" + "\n".join(splits) + "\n")


def separated_pairs(partitions: list[list[str]]) -> float:
    """Share of the mixture's conflicting pairs that land in different partitions."""
    where = {s: i for i, part in enumerate(partitions) for s in part}
    pairs = conflicting_pairs()
    return sum(where[a] != where[b] for a, b in pairs) / len(pairs)


def family_section(res: dict) -> str:
    """Accuracy % and loss per family for every arm, means over seeds."""
    fams = res["families"]
    new = new_convention_sources()
    rows = [["base", *(_family_cell([res["base"]["scores"]], fams[f]) for f in fams),
             _family_cell([res["base"]["scores"]], new)]]
    for arm in ARMS:
        runs = [r["scores"] for r in res["merit"] if r["arm"] == arm]
        if runs:
            rows.append([arm, *(_family_cell(runs, fams[f]) for f in fams),
                         _family_cell(runs, new)])
    return ("Per family (accuracy % / held-out loss, means over seeds; in a conflict family "
            "half of the sources use the cued new convention, which the base has never seen, "
            "so the base scores about 50% there and one model can reach 100%):\n\n"
            + markdown_table(["arm", *fams, "new convention (cued sources)"], rows) + "\n")


def remerge_section(res: dict) -> str:
    """The split arms' partitions merged by other methods (same trained partitions)."""
    from .merit import REMERGES

    sources = [s for f in res["families"].values() for s in f]
    new = new_convention_sources()
    arms = [a for a in ARMS if not a.startswith("joint")]
    rows = []
    for label, _, _ in [("token-weighted", "", {}), *REMERGES]:
        runs = [r if label == "token-weighted" else {**r, "scores": r["remerged"][label]}
                for r in res["merit"] if r["arm"] in arms and (label == "token-weighted"
                                                               or label in r.get("remerged", {}))]
        for row in merit_rows(runs, arms=arms, sources=sources,
                              conflict=res["conflict_sources"], budget=res["budget"]):
            arm_runs = [r for r in runs if r["arm"] == row[0]]
            rows.append([label, row[0], *row[4:],
                         fmt_ms([macro(r["scores"], new, "accuracy") for r in arm_runs],
                                scale=100)])
    if not rows:
        return ""
    headers = ["merge", "arm", *MERIT_HEADERS[4:], "accuracy % (new convention)"]
    return ("Same trained partitions, merged three ways (token-weighted is the table above; "
            "OTA uses each partition's rank-1 Adam second moments; the sum adds every "
            "partition's full update, no 1/K dilution):\n\n" + markdown_table(headers, rows)
            + "\n")


def axes_section(res: dict, *, top: int = 4) -> str:
    """Where the profiler puts the sources: each principal axis's two ends, per seed."""
    lines = []
    for seed in res["sizes"]["seeds"]:
        prof = res["profiles"].get(seed) or res["profiles"].get(str(seed))
        if prof is None:
            continue
        for axis, explained in enumerate(prof["explained"]):
            order = sorted(prof["names"], key=lambda n: prof["scores"][n][axis])
            neg = ", ".join(order[:top])
            pos = ", ".join(reversed(order[-top:]))
            lines.append([str(seed), f"PC{axis + 1}", f"{100 * explained:.1f}", pos, neg])
    return ("Principal axes of the centered conflict matrix (the axes MERIT splits along; the "
            f"{top} sources at each end):\n\n"
            + markdown_table(["seed", "axis", "variance %", "+ end", "- end"], lines) + "\n")


def _family_cell(runs: list[dict], names: list[str]) -> str:
    acc = sum(macro(r, names, "accuracy") for r in runs) / len(runs)
    loss = sum(macro(r, names, "loss") for r in runs) / len(runs)
    return f"{100 * acc:.1f} / {loss:.3f}"


def ota_rows(res: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    fams = res["families"]
    sources = [s for f in fams.values() for s in f]
    expert_own = {f: family_scores(res["experts"][f]["scores"], {f: fams[f]}, "accuracy")[f]
                  for f in fams}
    headers = ["merge", *fams, "mean acc %", "mean loss", "kept % (mean over families)"]
    rows, summary = [], []
    rows.append(["each family's own expert", *(f"{100 * expert_own[f]:.1f}" for f in fams),
                 f"{100 * sum(expert_own.values()) / len(fams):.1f}", "-", "100"])
    for r in res["ota"]:
        acc = family_scores(r["scores"], fams, "accuracy")
        kept = kept_fraction(acc, expert_own)
        finite = [v for v in kept.values() if not math.isnan(v)]
        mean_kept = sum(finite) / len(finite) if finite else math.nan
        mean_acc = macro(r["scores"], sources, "accuracy")
        rows.append([r["label"], *(f"{100 * acc[f]:.1f}" for f in fams), f"{100 * mean_acc:.1f}",
                     f"{macro(r['scores'], sources, 'loss'):.4f}", f"{100 * mean_kept:.1f}"])
        summary.append({"label": r["label"], "accuracy": mean_acc, "kept": mean_kept})
    return headers, rows, summary


def search_section(res: dict) -> str:
    s = res["search"]
    rows = [[", ".join(f"{w:.3f}" for w in c), f"{p:.4f}", f"{r:.4f}"]
            for c, p, r in sorted(zip(s["candidates"], s["proxy"], s["real"], strict=True),
                                  key=lambda t: t[1])]
    table = markdown_table([f"weights ({', '.join(s['families'])})", "proxy loss",
                            "real loss"], rows)
    return (f"## Mixture-search check\n\n{table}\n\nSpearman rho(proxy, real) = "
            f"**{s['spearman']:.3f}** (bootstrap 95% CI {s['ci95'][0]:.3f} .. {s['ci95'][1]:.3f}, "
            f"{len(rows)} candidates, {s['budget']} supervised tokens per real mixture). Proxy "
            f"pick {_weights(s['proxy_pick'])} has real rank {s['proxy_pick_real_rank']} of "
            f"{len(rows)}; real best {_weights(s['real_best'])}.{_ceiling(s)}\n")


def _ceiling(s: dict) -> str:
    if "seed_to_seed_spearman" not in s:
        return ""
    lo, hi = s["seed_to_seed_ci95"]
    per_seed = ", ".join(f"{x:.3f}" for x in s["proxy_vs_seed_spearman"])
    return (f" Noise ceiling: rho(real seed A, real seed B) = {s['seed_to_seed_spearman']:.3f} "
            f"(95% CI {lo:.3f} .. {hi:.3f}); rho(proxy, each seed) = {per_seed}. The real "
            "column is the mean of the two seeds.")


def _weights(w: list[float]) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in w) + ")"


def cost_section(res: dict) -> tuple[str, dict]:
    """Stage wall times, and profiling's share of the MERIT-8 pipeline (per seed)."""
    lines, shares = [], {}
    for seed in res["sizes"]["seeds"]:
        run = next(r for r in res["merit"] if r["arm"] == "merit-8" and r["seed"] == seed)
        prof = res["profiles"][seed if seed in res["profiles"] else str(seed)]["seconds"]
        seq = prof + sum(run["train_seconds"]) + run["merge_seconds"]
        par = prof + max(run["train_seconds"]) + run["merge_seconds"]
        shares[seed] = {"profile_s": prof, "train_s": sum(run["train_seconds"]),
                        "merge_s": run["merge_seconds"], "share_sequential": prof / seq,
                        "share_parallel": prof / par}
        lines.append([seed, f"{prof:.1f}", f"{sum(run['train_seconds']):.1f}",
                      f"{max(run['train_seconds']):.1f}", f"{run['merge_seconds']:.1f}",
                      f"{100 * prof / seq:.1f}%", f"{100 * prof / par:.1f}%"])
    share_table = markdown_table(
        ["seed", "profile s", "train s (8 partitions, sum)", "train s (slowest partition)",
         "merge s", "profiling share (sequential)", "profiling share (8 in parallel)"], lines)
    stage_rows = [[name, f"{sec:.1f}"] for name, sec in _grouped_stages(res["stages"]).items()]
    stage_table = markdown_table(["stage", "wall s"], stage_rows)
    sz = res["sizes"]
    n_sources = sum(len(v) for v in res["families"].values())
    calib = min(sz["calibration_samples"], sz["train_per_source"])
    ratio = (f"Profiling runs forward+backward on {n_sources} x {calib} calibration examples; "
             f"the 8 partitions train on {n_sources} x {sz['train_per_source']} examples (one "
             f"epoch): a ratio of {calib / sz['train_per_source']:.2f}, and that ratio, not the "
             "model size, is what sets profiling's share.\n")
    text = (f"## Cost\n\nStage wall times (whole benchmark {res['total_seconds'] / 60:.1f} min):"
            f"\n\n{stage_table}\n\nProfiling's share of the MERIT K=8 pipeline (profile + train "
            f"+ token-weighted merge; paper: 0.8% at 7B):\n\n{share_table}\n\n{ratio}")
    return text, shares


def _grouped_stages(stages: dict) -> dict:
    """Per-seed MERIT stages summed per arm so the table stays short."""
    out: dict[str, float] = {}
    for name, sec in stages.items():
        key = name.rsplit(" seed ", 1)[0] if name.startswith("MERIT") else name
        out[key] = out.get(key, 0.0) + sec
    return out


def write_report(res: dict, out: Path) -> str:
    """Write report.md and the PNGs under out; return the markdown."""
    sources = [s for f in res["families"].values() for s in f]
    per_arm = {a: [macro(r["scores"], sources, "accuracy") for r in res["merit"]
                   if r["arm"] == a] for a in ARMS}
    plots.plot_arms(out / "merit_accuracy.png", {a: v for a, v in per_arm.items() if v},
                    ylabel="mean held-out accuracy", title="MERIT arms (same token budget)",
                    reference=macro(res["base"]["scores"], sources, "accuracy"))
    per_arm_loss = {a: [macro(r["scores"], sources, "loss") for r in res["merit"]
                        if r["arm"] == a] for a in ARMS}
    plots.plot_arms(out / "merit_loss.png", {a: v for a, v in per_arm_loss.items() if v},
                    ylabel="mean held-out loss",
                    title="MERIT arms: held-out loss (lower is better)",
                    reference=macro(res["base"]["scores"], sources, "loss"))
    _conflict_plots(res, out)
    headers, rows, summary = ota_rows(res)
    plots.plot_merges(out / "ota_merges.png", [s["label"] for s in summary],
                      [s["accuracy"] for s in summary], [s["kept"] for s in summary])
    s = res["search"]
    plots.plot_search(out / "search.png", s["proxy"], s["real"], rho=s["spearman"])
    cost, shares = cost_section(res)
    res["profiling_share"] = shares
    plots.plot_cost(out / "cost.png", _grouped_stages(res["stages"]))
    b = res["base"]
    sz = res["sizes"]
    text = "\n".join([
        f"# Quality benchmark ({res['mode']})\n",
        f"Model: Qwen2, {b['parameters'] / 1e6:.2f}M parameters (hidden {sz['hidden']}, "
        f"{sz['layers']} layers), byte tokenizer; stage-2 base trained {b['steps']} steps. "
        f"{len(sources)} sources in {len(res['families'])} families, "
        f"{sz['train_per_source']} train / {sz['held_out_per_source']} held-out examples per "
        f"source; seeds {list(sz['seeds'])}.\n",
        merit_section(res), family_section(res), remerge_section(res), axes_section(res),
        "## OTA table\n\nOne expert per family (trained on that family's sources from the base);"
        " accuracy % per family, mean over all sources, and the share of each expert's own "
        "accuracy on its family that the merge keeps.\n",
        markdown_table(headers, rows), "",
        search_section(res), cost,
        f"Note: {res['resumed']['note']}.\n" if "resumed" in res else "",
    ])
    (out / "report.md").write_text(text)
    return text


def _conflict_plots(res: dict, out: Path) -> None:
    from merit_trainer.profiling.plots import plot_conflict, plot_pca

    seed = res["sizes"]["seeds"][0]
    prof = res["profiles"].get(seed) or res["profiles"][str(seed)]
    run = next(r for r in res["merit"] if r["arm"] == "merit-4" and r["seed"] == seed)
    plot_conflict(out / "conflict.png", np.array(prof["conflict"]), prof["names"],
                  run["partitions"], centered=True)
    plot_pca(out / "pca.png", prof["scores"], run["partitions"], prof["explained"])


__all__ = ["write_report", "fmt_ms"]
