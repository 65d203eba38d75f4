"""The merge on a GPU: its math against the device's memory bandwidth, and whole merges.

Two measurements, on a machine with CUDA:
  kernel  each element-wise method's math on blocks already resident on the GPU, in GB/s of
          the bytes it must move (K bf16 inputs, the base when the method reads it, the
          bf16 output), against a device-to-device copy measured the same way and the
          device's nominal bandwidth (--peak-gbs): the torch pass's (`method.merge` and the
          cast to bf16) and the fused GPU pass's Triton kernel (`gpukernels`, one launch
          over the block, "triton" rows);
  whole   whole `merge_throughput.py child` processes on the same 1B-parameter inputs, the
          merge on the GPU (`--device cuda`: the fused pass's units on the GPU, `gpuunits`,
          for token-weighted and OTA) against the merge on this node's CPU cores,
          alternated A B A B, medians, in GB/s of the input bytes read.
The whole merge reads its inputs from host memory (the page cache) and copies each block to
the GPU, so it is bounded by the host's memory and the PCIe link, not by the GPU's memory:
the kernel rows say what the math alone would reach.

    python bench/merge_device.py --params 1e9 --k 4 --rounds 2 --workdir /dev/shm/mb
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_throughput import build_inputs, command, input_files, measure, median  # noqa: E402

METHODS = ("token-weighted", "task-arithmetic", "ota")


def timed(fn, reps: int, dev) -> float:
    """Median seconds of `fn()` on `dev` (after one warm-up), synchronized."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return median(times)


def kernel_rows(k: int, numel: int, reps: int, device: str = "cuda") -> list[dict]:
    """GB/s of each method's math on resident bf16 blocks of `numel` elements."""
    import torch

    from merit_merger.methods import MergeInputs, Rank1Moment, get_method

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    rows_, cols = 4096, numel // 4096
    base = (torch.randn(rows_, cols, device=dev, generator=g) * 0.02).bfloat16()
    experts = [(base.float() + torch.randn(rows_, cols, device=dev, generator=g) * 1e-3)
               .bfloat16() for _ in range(k)]
    moments = [Rank1Moment(torch.rand(rows_, device=dev) + 1e-5,
                           torch.rand(cols, device=dev) + 1e-5, 1.0) for _ in range(k)]
    weights = [1.0 / k] * k
    src = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), reps, dev)
    rows = [{"what": "device-to-device copy", "bytes": 2 * src.nbytes, "seconds": copy_s}]
    for key in METHODS:
        impl = get_method(key)
        p = impl.parse_params({})
        uses_base = impl.uses_base(p)
        if impl.stored_dtype_ok:
            b, xs = base, experts
        else:  # the loader hands such methods fp32 blocks: the conversion is part of the math
            b, xs = base.float(), [e.float() for e in experts]

        def merge(impl=impl, p=p, b=b if uses_base else None, xs=xs):
            args = MergeInputs("t", b, xs, weights,
                               moments if impl.needs_moments else None)
            return impl.merge(args, p).to(torch.bfloat16)

        moved = (k + int(uses_base)) * base.nbytes + base.nbytes  # stored inputs + output
        if impl.needs_moments:
            moved += k * 4 * (rows_ + cols)
        rows.append({"what": key, "bytes": moved, "seconds": timed(merge, reps, dev)})
    return rows + triton_rows(base, experts, moments, reps, dev)


def triton_rows(base, experts, moments, reps: int, dev) -> list[dict]:
    """GB/s of the fused GPU pass's Triton kernels on the same resident bf16 blocks: the
    inputs laid out as `gpuunits` lays out a unit's (input i at byte i * slot)."""
    import numpy as np
    import torch

    from merit_merger import fused, gpukernels

    k, numel = len(experts), base.numel()
    slot = numel * 2
    src = torch.cat([t.reshape(-1).view(torch.uint8) for t in (*experts, base)])
    out = torch.empty(numel * 2, dtype=torch.uint8, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    codes = gpukernels.pack([fused.BF16] * (k + 1))
    w = np.full(k, 1.0 / k, np.float32)
    params = torch.from_numpy(np.concatenate([w, [0.5, 1 - k * 0.5]]).astype(np.float32)).to(dev)
    rows = []
    for key, program, reads in (("token-weighted", fused.TOKEN_WEIGHTED, k),
                                ("task-arithmetic", fused.TASK16, k + 1)):
        def run(program=program):
            gpukernels.launch_linear(src, out, flag, params, n=numel, slot=slot,
                                     program=program, k=k, codes=codes, out_code=fused.BF16)
        rows.append({"what": f"triton {key}", "bytes": (reads + 1) * base.nbytes,
                     "seconds": timed(run, reps, dev)})
    r = torch.stack([m.row for m in moments]).float().contiguous()
    c = torch.stack([m.col for m in moments]).float().contiguous()
    eps = torch.tensor([1e-26], device=dev)

    def ota():
        gpukernels.launch_ota(src, out, flag, eps, r, c, n=numel, slot=slot, lo=0,
                              stored=False, p=gpukernels.POWERS[0.5], use_base=False, k=k,
                              codes=codes, out_code=fused.BF16)
    rows.append({"what": "triton ota (rank-1)", "bytes": (k + 1) * base.nbytes
                 + k * 4 * (r.shape[1] + c.shape[1]), "seconds": timed(ota, reps, dev)})
    return rows


def whole_rows(root: Path, k: int, rounds: int, args: argparse.Namespace) -> list[dict]:
    """GPU vs CPU merges as whole processes, alternated; GB/s of the inputs read."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = []
    for key in ("token-weighted", "ota"):
        files = input_files(root, k, base=True, moments=key == "ota")
        size = sum(f.stat().st_size for f in files)
        cmds = {device: command(key, root, k, argparse.Namespace(**{**vars(args),
                                                                    "device": device}))
                for device in ("cuda", "cpu")}
        # one unmeasured GPU run first: it fills triton's kernel cache (a compile per kernel
        # variant, seconds, that a pod pays once) and says which pass the GPU merge took
        warm = subprocess.run(cmds["cuda"], env=env, capture_output=True, text=True,
                              check=True)
        kernel = json.loads(warm.stdout.strip().splitlines()[-1])["kernel"]
        print(f"{key} on cuda: the {kernel} pass", file=sys.stderr)
        runs: dict[str, list[float]] = {"cuda": [], "cpu": []}
        for _ in range(rounds):
            for device in ("cuda", "cpu"):
                runs[device].append(measure(cmds[device], env)["wall_s"])
                print(f"{key} on {device}: {runs[device][-1]:.2f} s", file=sys.stderr)
        out.append({"method": key, "input_bytes": size, "gpu_kernel": kernel,
                    **{f"{d}_wall_s": median(v) for d, v in runs.items()}, "runs": runs})
    return out


def report(kernels: list[dict], wholes: list[dict], peak_gbs: float, k: int,
           numel: int) -> str:
    copy = kernels[0]["bytes"] / kernels[0]["seconds"] / 1e9
    lines = [f"Math on resident blocks: K = {k}, {numel / 1e6:.0f}M bf16 elements per tensor",
             "", "| what | GB moved | ms | GB/s | of the copy | of nominal |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in kernels:
        gbs = r["bytes"] / r["seconds"] / 1e9
        lines.append(f"| {r['what']} | {r['bytes'] / 1e9:.2f} | {r['seconds'] * 1e3:.2f} | "
                     f"{gbs:.0f} | {gbs / copy:.0%} | {gbs / peak_gbs:.0%} |")
    lines += ["", f"Whole merges (processes, alternated, medians), K = {k}:", "",
              "| method | GPU pass | input GB | GPU wall s | CPU wall s | GPU GB/s | CPU GB/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in wholes:
        gb = r["input_bytes"] / 1e9
        lines.append(f"| {r['method']} | {r['gpu_kernel']} | {gb:.1f} | {r['cuda_wall_s']:.2f} | "
                     f"{r['cpu_wall_s']:.2f} | {gb / r['cuda_wall_s']:.1f} | "
                     f"{gb / r['cpu_wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--numel", type=int, default=1 << 28, help="elements per kernel block")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--peak-gbs", type=float, default=4800.0,
                        help="the device's nominal memory bandwidth (H200: 4.8 TB/s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge-device"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("no GPU: this benchmark measures the merge on one")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
    kernels = kernel_rows(args.k, args.numel, args.reps)
    torch.cuda.empty_cache()
    started = time.perf_counter()
    build_inputs(args.workdir, args.params, args.k, args.shard_mb * 1_000_000)
    print(f"inputs built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    wholes = whole_rows(args.workdir, args.k, args.rounds, args)
    print(report(kernels, wholes, args.peak_gbs, args.k, args.numel))
    if args.json:
        args.json.write_text(json.dumps({"kernels": kernels, "whole": wholes}, indent=1))


if __name__ == "__main__":
    main()
