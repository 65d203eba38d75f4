"""How much MERIT profiling costs on top of the backward passes it cannot avoid.

Builds a ~24M-parameter Qwen2 (hidden 512, 6 layers, MLP 2048, byte vocabulary), 8 sources x
16 examples of ~128 tokens, and times, over the same calibration micro-batches:
  - a plain forward+backward (every parameter requires grad; grads zeroed after each source),
  - profiling = gradients + count-sketch (parameters=all, with and without the hash cache,
    and parameters=attention).
It prints time ratios (target <= 1.3 for `all`), the sketch's state against the dense
(parameters x dim) projection it replaces, and peak RSS of each mode measured in a fresh
child process. Run: `python bench/profile_overhead.py [--dim 8192] [--repeats 1]` (a few minutes).
"""

from __future__ import annotations

import argparse
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import torch

from merit_trainer.profiling.gradients import GradientSketcher
from merit_trainer.profiling.sketch import CountSketch
from merit_trainer.tiny import build_byte_tokenizer, build_tiny_model
from meritrun.data import Example, Turn
from meritrun.textenc import collate, encode_example, token_losses

SOURCES, PER_SOURCE, MICRO_BATCH, SEQ = 8, 16, 8, 128
TRANSFORMS = {"copy": lambda w: w, "reverse": lambda w: w[::-1], "upper": str.upper,
              "sort": lambda w: "".join(sorted(w)), "swap": str.swapcase,
              "rot": lambda w: w[1:] + w[:1], "every2": lambda w: w[::2] * 2,
              "first": lambda w: w[:15] * 2}
MODES = ("plain", "all", "all-nocache", "attention")


def build_data(tokenizer) -> dict[str, list]:
    rng = random.Random(0)
    data = {}
    for name, fn in list(TRANSFORMS.items())[:SOURCES]:
        exs = []
        for _ in range(PER_SOURCE):
            text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(90))
            ex = Example(name, (Turn("user", f"{name}: {text}"), Turn("assistant", fn(text)[:30])))
            exs.append(encode_example(tokenizer, ex, max_len=SEQ))
        data[name] = exs
    return data


def build():
    torch.set_num_threads(2)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(vocab_size=len(tokenizer), hidden=512, layers=6, heads=8,
                             kv_heads=4, intermediate=2048)
    model.eval()
    return model, tokenizer, build_data(tokenizer)


def plain_pass(model, data, pad_id: int) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for encoded in data.values():
        tokens = sum(e.supervised for e in encoded)
        for start in range(0, len(encoded), MICRO_BATCH):
            summed, _ = token_losses(model, collate(encoded[start:start + MICRO_BATCH],
                                                    pad_id=pad_id))
            (summed.sum() / tokens).backward()
        model.zero_grad(set_to_none=True)


def profile_pass(model, data, pad_id: int, *, parameters: str, dim: int, cache: bool):
    sketch = CountSketch(dim, seed=0, cache_bytes=(1 << 30) if cache else 0)
    sketcher = GradientSketcher(model, parameters, sketch)
    rows = [sketcher.sketch_source(enc, micro_batch_size=MICRO_BATCH, pad_id=pad_id)[0]
            for enc in data.values()]
    sketcher.close()
    return sketcher, sketch, rows


def run_mode(mode: str, model, data, pad_id: int, dim: int):
    if mode == "plain":
        return plain_pass(model, data, pad_id)
    parameters = "attention" if mode == "attention" else "all"
    return profile_pass(model, data, pad_id, parameters=parameters, dim=dim,
                        cache=mode != "all-nocache")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, dim: int) -> None:
    """One mode in a fresh process; prints RSS before the pass and the peak during it (MiB).

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) after the model is built, so
    the peak is the pass's own (Linux only)."""
    model, tokenizer, data = build()
    data = dict(list(data.items())[:2])  # peak memory does not grow with the source count
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    run_mode(mode, model, data, tokenizer.pad_token_id, dim)
    print(f"{before:.0f} {_rss_mib('VmHWM'):.0f}")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dim)

    model, tokenizer, data = build()
    pad_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    first = dict(list(data.items())[:1])
    for mode in ("plain", "all"):  # warm-up: allocator, kernels
        run_mode(mode, model, first, pad_id, args.dim)
    wall = {m: float("inf") for m in MODES}
    cpu = {m: float("inf") for m in MODES}
    results = {}
    for _ in range(args.repeats):  # interleaved, best of: the machine is shared
        for mode in MODES:
            start, start_cpu = time.perf_counter(), time.process_time()
            results[mode] = run_mode(mode, model, data, pad_id, args.dim)
            wall[mode] = min(wall[mode], time.perf_counter() - start)
            cpu[mode] = min(cpu[mode], time.process_time() - start_cpu)

    tokens = sum(len(e.input_ids) for enc in data.values() for e in enc)
    print(f"model: Qwen2 {n_params / 1e6:.1f}M parameters; {SOURCES} sources x {PER_SOURCE} "
          f"examples ({tokens} tokens, <= {SEQ}/example), micro-batch {MICRO_BATCH}, "
          f"dim {args.dim}, {torch.get_num_threads()} threads")
    print("time over all sources; CPU = process CPU seconds (less sensitive to other load)")
    print(f"{'mode':<14}{'params sketched':>16}{'wall s':>9}{'x plain':>9}{'CPU s':>9}"
          f"{'x plain':>9}")
    for mode in MODES:
        count = n_params if mode == "plain" else results[mode][0].parameter_count
        print(f"{mode:<14}{count:>16,}{wall[mode]:>9.1f}{wall[mode] / wall['plain']:>9.2f}"
              f"{cpu[mode]:>9.1f}{cpu[mode] / cpu['plain']:>9.2f}")

    print("\nsketch state vs the dense projection it replaces (float32 P x dim):")
    print(f"{'mode':<14}{'dense matrix':>14}{'rows':>12}{'hash cache':>12}{'chunk temp':>12}"
          f"{'largest grad':>14}")
    for mode in MODES[1:]:
        sketcher, sketch, rows = results[mode]
        print(f"{mode:<14}{mib(4 * sketcher.parameter_count * args.dim):>14}"
              f"{mib(sum(r.nbytes for r in rows) + 12 * sketch.dim):>12}"
              f"{mib(sketch.cached_bytes):>12}{mib(sketch.peak_scratch_bytes):>12}"
              f"{mib(4 * sketcher.largest_parameter):>14}")

    print("\npeak RSS per mode, fresh process (after building the model -> peak, 2 sources):")
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dim", str(args.dim)],
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"{mode:<14}{out[0]:>8} MiB -> {out[1]:>6} MiB (+{int(out[1]) - int(out[0])} MiB)")


if __name__ == "__main__":
    main()
