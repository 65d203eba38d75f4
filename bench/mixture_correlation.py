"""Does the merged proxy rank data mixtures like real mixture training does? (DMO check)

Builds a merge-ready tiny Qwen2 base (briefly pre-trained on every synthetic task family),
fine-tunes one expert per domain, then for every candidate of the 3-domain 1/8 grid (21 points)
(a) scores the proxy theta0 + sum_i w_i tau_i and (b) trains the real mixture model from the
base at those weights with the same supervised-token budget, and scores it on the same held-out
set. Reports Spearman's rho between proxy and real scores with a bootstrap 95% interval over
candidates, the real rank of the proxy's pick, and (with --replicates 2) how well two seeds of
real training agree with each other: the noise ceiling any proxy is judged against.

    .venv/bin/python bench/mixture_correlation.py            # ~12 min idle, 25 min busy
    .venv/bin/python bench/mixture_correlation.py --quick    # smoke run, ~2 min

Writes bench/results/mixture_correlation.{json,md,png}. Not part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from merit_merger.evaluation import evaluate_model
from merit_merger.search import MergeProxy, objective_score, score_candidates, simplex_grid
from merit_trainer.tiny import build_byte_tokenizer, build_tiny_model
from meritrun.data import Example
from meritrun.synthetic import TASKS, make_mixture
from meritrun.textenc import collate, encode_example, token_losses

log = logging.getLogger("bench.mixture_correlation")
RESULTS = Path(__file__).parent / "results"


# --- statistics (numpy only) ----------------------------------------------------------------

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_ci(a: np.ndarray, b: np.ndarray, *, reps: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Spearman's rho over candidates resampled with replacement."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    rhos = [spearman(a[idx], b[idx]) for idx in rng.integers(0, len(a), size=(reps, len(a)))]
    rhos = np.array([r for r in rhos if not np.isnan(r)])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(rhos, tail)), float(np.percentile(rhos, 100 - tail))


# --- training -------------------------------------------------------------------------------

def train_mixture(model, tokenizer, pools: list[list], weights, *, token_budget: int, lr: float,
                  seed: int, batch: int = 16) -> int:
    """AdamW on batches whose domains are drawn from `weights` until `token_budget`
    supervised tokens were trained on; returns the steps taken."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    seen = steps = 0
    p = np.asarray(weights, dtype=float) / np.sum(weights)
    while seen < token_budget:
        domains = rng.choice(len(pools), size=batch, p=p)
        rows = [pools[d][rng.integers(len(pools[d]))] for d in domains]
        losses, counts = token_losses(model, collate(rows, pad_id=tokenizer.pad_token_id))
        opt.zero_grad()
        (losses.sum() / counts.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += int(counts.sum())
        steps += 1
    model.eval()
    return steps


def encode_pools(tokenizer, examples: list[Example], domains: list[str]) -> list[list]:
    return [[encode_example(tokenizer, ex, max_len=128) for ex in examples if ex.source == d]
            for d in domains]


# --- the benchmark --------------------------------------------------------------------------

def build_base(args: argparse.Namespace):
    """(tokenizer, base model, held-out examples, per-domain pools, token budget)."""
    tokenizer = build_byte_tokenizer()
    base = build_tiny_model(vocab_size=len(tokenizer), hidden=args.hidden, layers=args.layers,
                            heads=4, kv_heads=2, seed=args.seed)
    base.config.pad_token_id = tokenizer.pad_token_id
    base.config.eos_token_id = tokenizer.eos_token_id
    broad, _ = make_mixture([(t, t) for t in TASKS], train=400, held_out=0, seed=args.seed + 1)
    train, held = make_mixture([(d, d) for d in args.domains], train=400,
                               held_out=args.held_out, seed=args.seed)
    broad_pools = encode_pools(tokenizer, broad, list(TASKS))
    per_step = 16 * np.mean([e.supervised for pool in broad_pools for e in pool])
    steps = train_mixture(base, tokenizer, broad_pools, [1.0] * len(TASKS),
                          token_budget=int(args.base_steps * per_step), lr=3e-3, seed=args.seed)
    log.info("base: %d steps on %d task families", steps, len(TASKS))
    pools = encode_pools(tokenizer, train, args.domains)
    budget = int(args.steps * 16 * np.mean([e.supervised for pool in pools for e in pool]))
    return tokenizer, base, held, pools, budget


def run_regime(args: argparse.Namespace, lr: float, base, tokenizer, held, pools,
               budget: int) -> dict:
    """Experts, proxy scores and real mixture scores at one fine-tuning learning rate."""
    def fine_tune(weights, seed: int):
        model = copy.deepcopy(base)
        train_mixture(model, tokenizer, pools, weights, token_budget=budget, lr=lr, seed=seed)
        return model

    t1 = time.perf_counter()
    n = len(args.domains)
    experts = [fine_tune(np.eye(n)[i], args.seed + 100) for i in range(n)]
    theta0 = {name: p.detach().clone() for name, p in base.named_parameters()}
    deltas = [{name: p.detach() - theta0[name] for name, p in e.named_parameters()}
              for e in experts]
    base_norm = torch.sqrt(sum((t ** 2).sum() for t in theta0.values()))
    moved = [float(torch.sqrt(sum((t ** 2).sum() for t in d.values())) / base_norm)
             for d in deltas]
    candidates = simplex_grid(n, args.grid)
    if args.limit:
        candidates = candidates[:: max(1, len(candidates) // args.limit)][: args.limit]
    proxy = MergeProxy(copy.deepcopy(base), theta0, deltas)
    search = score_candidates(proxy, tokenizer, held, candidates, objective=args.objective,
                              names=args.domains, batch_size=64)
    proxy_scores = np.array(search.scores)
    t_proxy = time.perf_counter() - t1
    log.info("lr %g: experts + proxy search %.0fs", lr, t_proxy)

    t2 = time.perf_counter()
    real = np.zeros((args.replicates, len(candidates)))
    for r in range(args.replicates):
        for c, w in enumerate(candidates):
            result = evaluate_model(fine_tune(w, args.seed + 1000 * (r + 1)), tokenizer, held,
                                    batch_size=64, generate=False)
            real[r, c] = objective_score(result, args.objective)
            log.info("lr %g real r%d %s: %.4f (proxy %.4f)", lr, r, w, real[r, c],
                     proxy_scores[c])
    real_mean = real.mean(axis=0)
    lo, hi = bootstrap_ci(proxy_scores, real_mean, seed=args.seed)
    pick = int(np.argmin(proxy_scores))
    out = {
        "lr": lr, "candidates": [list(c) for c in candidates],
        "expert_delta_relative_norm": moved,
        "proxy": proxy_scores.tolist(), "real": real.tolist(),
        "spearman": spearman(proxy_scores, real_mean), "ci95": [lo, hi],
        "proxy_pick": list(candidates[pick]),
        "proxy_pick_real_rank": int(rankdata(real_mean)[pick]),
        "real_best": list(candidates[int(np.argmin(real_mean))]),
        "regret": float(real_mean[pick] - real_mean.min()),
        "base_score": objective_score(search.base, args.objective),
        "seconds": {"experts_and_proxy": t_proxy, "real_mixtures": time.perf_counter() - t2},
    }
    if args.replicates > 1:
        out["seed_to_seed_spearman"] = spearman(real[0], real[1])
        out["seed_to_seed_ci95"] = list(bootstrap_ci(real[0], real[1], seed=args.seed))
        out["proxy_vs_seed_spearman"] = [spearman(proxy_scores, row) for row in real]
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer, base, held, pools, budget = build_base(args)
    regimes = [run_regime(args, lr, base, tokenizer, held, pools, budget) for lr in args.lrs]
    return {
        "domains": args.domains, "objective": args.objective, "regimes": regimes,
        "parameters": sum(p.numel() for p in base.parameters()), "token_budget": budget,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": time.perf_counter() - t0,
    }


def format_regime(res: dict, reg: dict) -> str:
    lines = [f"fine-tuning lr {reg['lr']:g} (expert ||tau|| / ||theta0|| = "
             + ", ".join(f"{m:.3f}" for m in reg["expert_delta_relative_norm"]) + ")",
             f"{'weights (' + ', '.join(res['domains']) + ')':<34}{'proxy':>9}{'real':>9}"]
    real = np.mean(reg["real"], axis=0)
    for w, p, r in sorted(zip(reg["candidates"], reg["proxy"], real, strict=True),
                          key=lambda t: t[1]):
        lines.append(f"{', '.join(f'{x:.3f}' for x in w):<34}{p:>9.4f}{r:>9.4f}")
    lo, hi = reg["ci95"]
    lines += [
        f"Spearman rho(proxy, real) = {reg['spearman']:.3f}  (bootstrap 95% CI {lo:.3f} .. "
        f"{hi:.3f}, {len(reg['candidates'])} candidates)",
        f"proxy pick {reg['proxy_pick']} has real rank {reg['proxy_pick_real_rank']}; "
        f"real best {reg['real_best']}; regret {reg['regret']:.4f} {res['objective']}",
    ]
    if "seed_to_seed_spearman" in reg:
        lo, hi = reg["seed_to_seed_ci95"]
        lines.append(f"noise ceiling: rho(real seed A, real seed B) = "
                     f"{reg['seed_to_seed_spearman']:.3f} (95% CI {lo:.3f} .. {hi:.3f}); "
                     "rho(proxy, each seed) = "
                     + ", ".join(f"{r:.3f}" for r in reg["proxy_vs_seed_spearman"]))
    s = reg["seconds"]
    lines.append(f"time: experts + proxy search {s['experts_and_proxy']:.0f}s, real mixtures "
                 f"{s['real_mixtures']:.0f}s")
    return "\n".join(lines)


def format_table(res: dict) -> str:
    head = (f"{res['parameters']} parameters, {res['token_budget']} supervised tokens per "
            f"training, objective {res['objective']}, total {res['seconds']:.0f}s")
    return "\n\n".join([head, *(format_regime(res, reg) for reg in res["regimes"])])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = res["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 4), squeeze=False)
    for ax, reg in zip(axes[0], regimes, strict=True):
        ax.scatter(reg["proxy"], np.mean(reg["real"], axis=0))
        ax.set_xlabel(f"proxy {res['objective']}")
        ax.set_ylabel(f"real mixture {res['objective']}")
        ax.set_title(f"lr {reg['lr']:g}: Spearman rho = {reg['spearman']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", nargs=3, default=["copy", "reverse", "add"], choices=list(TASKS))
    p.add_argument("--objective", default="mean-loss", choices=["mean-loss", "weighted"])
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="score only this many candidates")
    p.add_argument("--steps", type=int, default=150, help="token budget, in average steps")
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3],
                   help="fine-tuning learning rates: one regime each (experts and mixtures)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--held-out", type=int, default=64, help="held-out examples per domain")
    p.add_argument("--replicates", type=int, default=2, help="real-training seeds per point")
    p.add_argument("--threads", type=int, default=1, help="torch threads (<= 2 here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.base_steps, args.limit, args.replicates = 20, 40, 6, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    table = format_table(res)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "mixture_correlation" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(f"```\n{table}\n```\n")
    plot(res, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
