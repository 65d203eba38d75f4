"""Merge throughput: the streaming engine vs mergekit's linear merge vs `cat`, side by side.

Builds a synthetic Qwen2-like model (Qwen2.5-0.5B shapes by default: hidden 896, 24 layers,
vocab 151936, tied embeddings) in bf16, sharded, written directly with safetensors (no
transformers model is instantiated), and K perturbed expert copies with rank-1 second
moments. For each K it measures, each merge in its own subprocess:
  cat        cat of the input files to /dev/null (the physical floor: page cache -> user),
  tw         MeritRun token-weighted (reads the K experts),
  ota        MeritRun OTA with rank-1 second moments (reads base + K experts + factors),
  mergekit   mergekit-yaml on the equivalent linear recipe (same inputs as tw),
reporting wall time, input GB/s, peak RSS (the kernel's VmHWM, printed by each child at exit)
and peak anonymous memory
(RssAnon sampled every 20 ms). Inputs are read once by `cat` first, so every tool sees a warm
page cache. Results go to bench/results/ (JSON + markdown) and the table is printed.

    python bench/merge_throughput.py --params 0.5e9 --k 2,4,8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
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
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return config
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
    """Run cmd; wall time and peak RssAnon (sampled; the children report their own VmHWM)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_anon_mb": peak_anon[0] / 1e6,
            "stdout": out.decode(errors="replace")}


def child(args: argparse.Namespace) -> None:
    """One merge in this process (run by `measure`); prints peak RSS as seen by the kernel."""
    import torch

    from merit_merger.engine import merge_models
    from merit_merger.sources import PartitionSource

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    parts = [PartitionSource(f"e{i}", root / f"e{i}", 1000 * (i + 1),
                             moments=root / f"e{i}_v.safetensors") for i in range(args.k)]
    result = merge_models(base_dir=root / "base", partitions=parts, method=args.method,
                          out_dir=Path(args.out), shard_size_bytes=args.shard_mb * 1_000_000)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
    print(json.dumps({"bytes_read": result.bytes_read, "vm_hwm": hwm,
                      "seconds": result.seconds}))


def input_files(root: Path, k: int, *, base: bool, moments: bool) -> list[Path]:
    dirs = ([root / "base"] if base else []) + [root / f"e{i}" for i in range(k)]
    files = [f for d in dirs for f in sorted(d.glob("*.safetensors"))]
    return files + ([root / f"e{i}_v.safetensors" for i in range(k)] if moments else [])


def run_k(root: Path, k: int, args: argparse.Namespace, env: dict) -> list[dict]:
    rows = []
    tw_files = input_files(root, k, base=False, moments=False)
    gb = sum(f.stat().st_size for f in tw_files) / 1e9
    ota_files = input_files(root, k, base=True, moments=True)
    subprocess.run(["cat", *map(str, ota_files)], stdout=subprocess.DEVNULL, check=True)  # warm
    cat = measure(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, tw_files)], env)
    rows.append({"k": k, "tool": "cat", "input_gb": gb, **cat})
    for method in args.methods:
        out = root / f"out-{method}-{k}"
        r = measure([sys.executable, __file__, "child", "--root", str(root), "--k", str(k),
                     "--method", method, "--out", str(out), "--threads", str(args.threads),
                     "--shard-mb", str(args.shard_mb)], env)
        info = json.loads(r.pop("stdout").strip().splitlines()[-1])
        rows.append({"k": k, "tool": f"meritrun {method}", "input_gb": info["bytes_read"] / 1e9,
                     "peak_rss_mb": info["vm_hwm"] / 1e6, **r})
        shutil.rmtree(out, ignore_errors=True)
    if args.mergekit:
        rows.append(run_mergekit(root, k, args, env, gb))
    return rows


def run_mergekit(root: Path, k: int, args: argparse.Namespace, env: dict, gb: float) -> dict:
    import yaml

    total = sum(1000 * (i + 1) for i in range(k))
    recipe = {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
              "models": [{"model": str(root / f"e{i}"),
                          "parameters": {"weight": 1000 * (i + 1) / total}} for i in range(k)]}
    path, out = root / f"mergekit-{k}.yaml", root / f"out-mergekit-{k}"
    path.write_text(yaml.safe_dump(recipe))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    cmd = [sys.executable, "-c", MERGEKIT_WRAPPER, str(exe), str(path), str(out),
           "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "-j", str(args.threads),
           "--out-shard-size", str(args.shard_mb * 1_000_000 // 2)]
    r = measure(cmd, env)
    info = json.loads(r.pop("stdout").strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"k": k, "tool": "mergekit linear", "input_gb": gb,
            "peak_rss_mb": info["vm_hwm"] / 1e6, **r}


# runs mergekit's CLI in-process so its own VmHWM can be read at exit
MERGEKIT_WRAPPER = """
import json, runpy, sys, atexit
def report():
    lines = open('/proc/self/status').read().splitlines()
    hwm = next(int(l.split()[1]) * 1024 for l in lines if l.startswith('VmHWM:'))
    print(json.dumps({'vm_hwm': hwm}), flush=True)
atexit.register(report)
exe = sys.argv[1]
sys.argv = [exe] + sys.argv[2:]
import torch; torch.set_num_threads(int(sys.argv[sys.argv.index('-j') + 1]))
runpy.run_path(exe, run_name='__main__')
"""


def table(rows: list[dict]) -> str:
    lines = ["| K | tool | input GB | wall s | GB/s | peak RSS MB | peak anon MB | x mergekit |",
             "|---|---|---|---|---|---|---|---|"]
    by_k = {}
    for r in rows:
        by_k.setdefault(r["k"], {})[r["tool"]] = r
    for r in rows:
        mk = by_k[r["k"]].get("mergekit linear")
        speed = f"{mk['wall_s'] / r['wall_s']:.1f}x" if mk and r["tool"] != "cat" else ""
        rss = r.get("peak_rss_mb")
        lines.append(f"| {r['k']} | {r['tool']} | {r['input_gb']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['input_gb'] / r['wall_s']:.2f} | {'' if rss is None else f'{rss:.0f}'} "
                     f"| {r['peak_anon_mb']:.0f} | {speed} |")
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
    parser.add_argument("--params", type=float, default=0.5e9)
    parser.add_argument("--k", default="2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="token-weighted,ota")
    parser.add_argument("--shard-mb", type=int, default=500, help="output shard size (both)")
    parser.add_argument("--no-mergekit", dest="mergekit", action="store_false")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/meritrun-bench"))
    args = parser.parse_args()
    if args.cmd == "child":
        return child(args)
    args.methods = args.methods.split(",")
    ks = [int(k) for k in args.k.split(",")]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    build_inputs(args.workdir, args.params, max(ks), 256_000_000)
    print(f"inputs ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    rows = [row for k in ks for row in run_k(args.workdir, k, args, env)]
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"params": args.params, "threads": args.threads, "shard_mb": args.shard_mb,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    (out_dir / f"merge_throughput-{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = f"{table(rows)}\n\n{json.dumps(meta)}"
    (out_dir / f"merge_throughput-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
