"""Merge throughput: MeritRun's streaming engine against mergekit on the same inputs.

Builds a synthetic Qwen2-like model (hidden 896, vocab 151936, tied embeddings, as many
layers as fit --params) in bf16, sharded, written directly with safetensors, and K perturbed
expert copies with rank-1 second moments. Then, for each K, it runs whole processes in
alternation, A B A B ..., for --rounds rounds (a machine's speed drifts; only pairs taken
side by side compare), one process per merge, and reports per pair the median wall time,
the median of the per-round ratios, and each tool's peak RSS (the kernel's VmHWM of the
process; it starts from this bench's own, about 15 MiB, so the inputs are built in a process of
their own). The pairs (A vs B):
  token-weighted   vs mergekit linear (the same weights, normalize false)
  task-arithmetic  vs mergekit task_arithmetic (lambda 1)
  ties             vs mergekit ties (density 0.2, normalize true = the disjoint mean)
  ota (rank-1)     vs MeritRun token-weighted (OTA has no mergekit equivalent)
  ffg              OTA with FFG masks (density 0.2) vs OTA without
  cat              vs token-weighted (the floor: reading the inputs from the page cache)
mergekit runs from its own environment (--mergekit PATH/TO/mergekit-yaml), so installing it
never changes this project's pins. Results go to bench/results/ (JSON + markdown).

    python bench/merge_throughput.py --params 1e9 --k 4,8 --rounds 3 \
        --mergekit /path/to/venv/bin/mergekit-yaml --pairs token-weighted,ties,ota

Each command can also be printed (`cmd TOOL`) to time it with an external harness.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 896, 4864, 151936, 14, 2


def qwen2_shapes(params: float) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """Qwen2 config and tensor shapes with as many layers as fit `params` parameters."""
    kv = HIDDEN // HEADS * KV_HEADS
    layer = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.q_proj.bias", (HIDDEN,)),
             ("self_attn.k_proj.weight", (kv, HIDDEN)), ("self_attn.k_proj.bias", (kv,)),
             ("self_attn.v_proj.weight", (kv, HIDDEN)), ("self_attn.v_proj.bias", (kv,)),
             ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
             ("mlp.gate_proj.weight", (INTER, HIDDEN)), ("mlp.up_proj.weight", (INTER, HIDDEN)),
             ("mlp.down_proj.weight", (HIDDEN, INTER)),
             ("input_layernorm.weight", (HIDDEN,)), ("post_attention_layernorm.weight", (HIDDEN,))]
    per_layer = sum(_numel(s) for _, s in layer)
    layers = max(1, round((params - VOCAB * HIDDEN) / per_layer))
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    shapes += [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in layer]
    shapes.append(("model.norm.weight", (HIDDEN,)))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "vocab_size": VOCAB,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    return config, shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _save_sharded(out: Path, tensors: dict, shard_bytes: int, config: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def build_inputs(root: Path, params: float, k_max: int, shard_bytes: int) -> dict:
    """base/, e0..e{k-1}/ and e{i}_v.safetensors (rank-1 moments); reused when present."""
    import torch
    from safetensors.torch import save_file

    config, shapes = qwen2_shapes(params)
    marker = root / "inputs.json"
    want = {"params": params, "k": k_max, "layers": config["num_hidden_layers"]}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have | {"k": want["k"]} == want and have["k"] >= k_max:
            return config  # built for as many experts or more: e0..e{k-1} are the same
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=g) * 0.02).bfloat16() for n, s in shapes}
    noise = {n: (torch.randn(s, generator=g) * 1e-3).bfloat16() for n, s in shapes}
    _save_sharded(root / "base", base, shard_bytes, config)
    for k in range(k_max):
        expert = {n: base[n] + (k + 1) * noise[n] for n in base}
        _save_sharded(root / f"e{k}", expert, shard_bytes, config)
        moments = {}
        for n, s in shapes:
            if len(s) < 2:
                moments[n] = torch.rand(s, generator=g) * 1e-8
                continue
            moments[f"{n}::row"] = torch.rand(s[0], generator=g) * 1e-4 + 1e-5
            moments[f"{n}::col"] = torch.rand(_numel(s[1:]), generator=g) * 1e-4 + 1e-5
            moments[f"{n}::total"] = torch.ones(1)
        meta = {"kind": "rank1", "beta2": "0.999", "step": "100", "bias_corrected": "false"}
        save_file(moments, str(root / f"e{k}_v.safetensors"), metadata=meta)
        del expert
    marker.write_text(json.dumps(want))
    return config


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd as a whole process: wall seconds and its peak RSS (VmHWM, via wait4)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def child(args: argparse.Namespace) -> None:
    """One MeritRun merge in this process (the A side of a pair). No torch here: a merge that
    takes the fused pass never imports it (the engine does for the torch pass)."""
    from merit_merger.engine import merge_models
    from merit_merger.sources import PartitionSource

    root = Path(args.root)
    parts = [PartitionSource(f"e{i}", root / f"e{i}", 1000 * (i + 1),
                             moments=root / f"e{i}_v.safetensors") for i in range(args.k)]
    params = {"density": 0.2} if args.method == "ties" else {}
    if args.density is not None:  # OTA: FFG masks
        params = {"density": args.density}
    result = merge_models(base_dir=root / "base", partitions=parts, method=args.method,
                          params=params, out_dir=Path(args.out),
                          shard_size_bytes=args.shard_mb * 1_000_000, device=args.device,
                          threads=args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps({"kernel": result.kernel, "bytes_read": result.bytes_read,
                      "seconds": result.seconds}), file=sys.stderr)


def mergekit_recipe(root: Path, k: int, method: str) -> dict:
    """mergekit's recipe for the same merge as MeritRun's `method` on e0..e{k-1}."""
    total = sum(1000 * (i + 1) for i in range(k))
    if method == "token-weighted":
        return {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
                "models": [{"model": str(root / f"e{i}"),
                            "parameters": {"weight": 1000 * (i + 1) / total}} for i in range(k)]}
    kind = {"task-arithmetic": "task_arithmetic", "ties": "ties"}[method]
    model_params = {"weight": 1.0} | ({"density": 0.2} if method == "ties" else {})
    return {"merge_method": kind, "dtype": "bfloat16", "base_model": str(root / "base"),
            "parameters": {"normalize": method == "ties", "lambda": 1.0},
            "models": [{"model": str(root / f"e{i}"), "parameters": model_params}
                       for i in range(k)]}


def command(tool: str, root: Path, k: int, args: argparse.Namespace) -> list[str]:
    """argv of one tool: `cat`, `mergekit:METHOD`, a MeritRun method, or `METHOD@s3`."""
    if tool.endswith("@s3"):  # the from-S3 column: bench/merge_from_s3.py
        from merge_from_s3 import command as s3_command

        return s3_command(tool, root, k, args)
    out = str(root / f"out-{tool.replace(':', '-')}-{k}")
    if tool == "cat":
        files = input_files(root, k, base=False, moments=False)
        return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)]
    if tool.startswith("mergekit:"):
        import yaml

        method = tool.split(":", 1)[1]
        path = root / f"mergekit-{method}-{k}.yaml"
        path.write_text(yaml.safe_dump(mergekit_recipe(root, k, method)))
        return ["sh", "-c", f'"$0" "$@"; rc=$?; rm -rf {out}; exit $rc', args.mergekit,
                str(path), out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                "--out-shard-size", str(args.shard_mb * 1_000_000 // 2)]
    method, _, masks = tool.partition("+")  # ota+ffg: OTA with FFG masks, density 0.2
    return [sys.executable, str(Path(__file__).resolve()), "child", "--root", str(root),
            "--k", str(k), "--method", method, "--out", out, "--threads", str(args.threads),
            "--shard-mb", str(args.shard_mb), "--device", args.device,
            *(["--density", "0.2"] if masks == "ffg" else [])]


PAIRS = {"token-weighted": ("token-weighted", "mergekit:token-weighted"),
         "task-arithmetic": ("task-arithmetic", "mergekit:task-arithmetic"),
         "ties": ("ties", "mergekit:ties"),
         "ota": ("ota", "token-weighted"),
         "ffg": ("ota+ffg", "ota"),  # FFG's two threshold scans: their cost over OTA's
         "cat": ("cat", "token-weighted"),
         "s3": ("token-weighted@s3", "token-weighted")}  # --from-s3: MinIO on loopback


def input_files(root: Path, k: int, *, base: bool, moments: bool) -> list[Path]:
    dirs = ([root / "base"] if base else []) + [root / f"e{i}" for i in range(k)]
    files = [f for d in dirs for f in sorted(d.glob("*.safetensors"))]
    return files + ([root / f"e{i}_v.safetensors" for i in range(k)] if moments else [])


def run_pair(root: Path, k: int, pair: str, args: argparse.Namespace, env: dict) -> dict:
    """A B A B ... for args.rounds rounds; medians and the median per-round ratio A/B."""
    a, b = PAIRS[pair]
    cmds = {t: command(t, root, k, args) for t in (a, b)}
    runs: dict[str, list[dict]] = {a: [], b: []}
    for _ in range(args.rounds):
        for tool in (a, b):
            runs[tool].append(measure(cmds[tool], env))
            print(f"K={k} {tool}: {runs[tool][-1]['wall_s']:.1f} s", file=sys.stderr)
    ratios = [ra["wall_s"] / rb["wall_s"] for ra, rb in zip(runs[a], runs[b], strict=True)]
    return {"k": k, "a": a, "b": b, "rounds": args.rounds,
            "a_wall_s": median(r["wall_s"] for r in runs[a]),
            "b_wall_s": median(r["wall_s"] for r in runs[b]),
            "a_peak_mb": median(r["peak_rss_mb"] for r in runs[a]),
            "b_peak_mb": median(r["peak_rss_mb"] for r in runs[b]),
            "ratio_a_over_b": median(ratios), "runs": runs}


def median(values) -> float:
    return statistics.median(list(values))


def table(rows: list[dict]) -> str:
    lines = ["| K | A | B | A wall s | B wall s | B/A speed-up | A CPU s | B CPU s | A peak MiB "
             "| B peak MiB | A/B memory | load |", "|---|---|---|" + "---:|" * 9]
    for r in rows:
        cpu = [median(x["cpu_s"] for x in r["runs"][t]) for t in (r["a"], r["b"])]
        load = "-".join(f"{x:.0f}" for x in r.get("load_avg_1min", []))
        lines.append(f"| {r['k']} | {r['a']} | {r['b']} | {r['a_wall_s']:.1f} | "
                     f"{r['b_wall_s']:.1f} | {1 / r['ratio_a_over_b']:.2f}x | {cpu[0]:.1f} | "
                     f"{cpu[1]:.1f} | {r['a_peak_mb']:.0f} | {r['b_peak_mb']:.0f} | "
                     f"{r['a_peak_mb'] / max(r['b_peak_mb'], 1):.2f} | {load} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    for flag in ("--root", "--method", "--out"):
        c.add_argument(flag, required=True)
    c.add_argument("--k", type=int, required=True)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--shard-mb", type=int, default=500)
    c.add_argument("--device", default="cpu")
    c.add_argument("--density", type=float, help="the density (OTA: FFG keep fraction)")
    sub.add_parser("build", help="build the inputs (reused when present)")
    show = sub.add_parser("cmd", help="print one tool's command line (shell-quoted)")
    show.add_argument("tool", help="cat, mergekit:METHOD or a MeritRun method")
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--k", default="4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="MeritRun's device (cpu, cuda)")
    parser.add_argument("--pairs", default="token-weighted,task-arithmetic,ties,ota,cat",
                        help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--mergekit", default="mergekit-yaml",
                        help="mergekit-yaml of a separate environment")
    parser.add_argument("--shard-mb", type=int, default=500, help="output shard size (both)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/meritrun-bench"))
    parser.add_argument("--from-s3", action="store_true", help="add the pair s3: token-"
                        "weighted verified and merged from MinIO on loopback vs local")
    args = parser.parse_args()
    if args.cmd == "child":
        return child(args)
    ks = [int(k) for k in args.k.split(",")]
    if args.cmd == "build":
        build_inputs(args.workdir, args.params, max(ks), 256_000_000)
        return None
    # built in a process of its own: a child's peak RSS as wait4 reports it starts from this
    # process's (exec keeps the larger high-water mark), so this one must stay small (no torch)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--params", str(args.params),
                    "--k", args.k, "--workdir", str(args.workdir), "build"], check=True)
    if args.cmd == "cmd":
        print(shlex.join(command(args.tool, args.workdir, ks[0], args)))
        return None
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1"}
    files = input_files(args.workdir, max(ks), base=True, moments=True)
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm
    pairs = args.pairs.split(",")
    if args.from_s3:  # the from-S3 column (bench/merge_from_s3.py): MinIO on loopback
        from merge_from_s3 import serve

        server, s3_env = serve(args.workdir, max(ks))
        atexit.register(server.stop)
        env |= s3_env
        pairs = [*pairs, "s3"] if "s3" not in pairs else pairs
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"params": args.params, "threads": args.threads, "rounds": args.rounds,
            "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    rows: list[dict] = []
    for k in ks:
        for pair in pairs:
            load = os.getloadavg()[0]
            rows.append(run_pair(args.workdir, k, pair, args, env))
            rows[-1]["load_avg_1min"] = [load, os.getloadavg()[0]]  # before, after the pair
            # written after every pair: a long run interrupted still leaves its rows
            meta["load_avg_end"] = os.getloadavg()
            (out_dir / f"merge_throughput-{stamp}.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1))
            text = f"{table(rows)}\n\n{json.dumps(meta)}"
            (out_dir / f"merge_throughput-{stamp}.md").write_text(text + "\n")
    print(text)
    return None


if __name__ == "__main__":
    main()
