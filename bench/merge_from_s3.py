"""The from-S3 column of bench/merge_throughput.py: the same merge, inputs in MinIO on loopback.

`serve(root, k)` starts a MinIO server (tests/support/minio.py, the binary
scripts/kube-bins.sh builds), uploads base/, e0..e{k-1}/ and the moments once, and returns
the server and the environment a child needs. A child (`python bench/merge_from_s3.py child
...`) does what the merge stage does with streamed inputs: mounts the weight files (no local
copy), runs the verify pass (every file hashed and value-checked, front to back, in ranged
GETs) and the merge pass (ranged GETs by header offsets, update norms judged on the way), and
prints the bytes it read. So its wall time is the stage's whole read cost; compare it with
the local column's merge alone to see what verification plus the network adds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BUCKET = "bench"


def serve(root: Path, k: int):
    """(running MinioServer, env for the children): the inputs uploaded under s3://bench/."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from support.minio import MinioServer

    from meritrun.storage import open_storage

    server = MinioServer().start()
    server.make_bucket(BUCKET)
    storage = open_storage(f"s3://{BUCKET}", endpoint=server.endpoint,
                           access_key=server.access_key, secret_key=server.secret_key)
    started = time.monotonic()
    for d in ["base", *(f"e{i}" for i in range(k))]:
        storage.upload_dir(root / d, d)
    for i in range(k):
        storage.put_file(f"e{i}_v.safetensors", root / f"e{i}_v.safetensors")
    print(f"uploaded the inputs to MinIO in {time.monotonic() - started:.1f} s", file=sys.stderr)
    env = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
           "MERITRUN_S3_ENDPOINT": server.endpoint}
    return server, env


def child(args: argparse.Namespace) -> None:
    """One streamed merge (verify pass + merge pass) of inputs in s3://bench/. No torch here:
    the verify pass and a fused merge pass (the norm scan in it) never import it."""
    from merit_merger.engine import merge_models
    from merit_merger.fetch import mount_objects
    from merit_merger.remote import mounted
    from merit_merger.sources import PartitionSource
    from merit_merger.streamcheck import stream_file
    from merit_merger.verification import NormScan
    from meritrun.storage import open_storage

    storage = open_storage(f"s3://{BUCKET}")
    local = Path(args.scratch)  # small files only (config.json)
    shutil.rmtree(local, ignore_errors=True)
    mounts = {}
    for d in ["base", *(f"e{i}" for i in range(args.k))]:
        rels = [key.split("/", 1)[1] for key in storage.list_keys(d)]
        mounts |= mount_objects(storage, d, rels, local / d)
    mounts |= mount_objects(storage, "", [f"e{i}_v.safetensors" for i in range(args.k)], local)
    parts = [PartitionSource(f"e{i}", local / f"e{i}", 1000 * (i + 1),
                             moments=local / f"e{i}_v.safetensors") for i in range(args.k)]
    timings = {}
    with mounted(mounts):
        started = time.monotonic()
        for path in mounts:  # the verify pass: sha256 and stored values, once per file
            stream_file(path)
        timings["verify"] = time.monotonic() - started
        params = {"density": 0.2} if args.method == "ties" else {}
        result = merge_models(base_dir=local / "base", partitions=parts, method=args.method,
                              params=params, out_dir=Path(args.out),
                              shard_size_bytes=args.shard_mb * 1_000_000,
                              observe=NormScan([p.name for p in parts]), threads=args.threads)
        timings["merge"] = time.monotonic() - started - timings["verify"]
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    inputs = sum(f.size for f in mounts.values())
    print(json.dumps({"input_bytes": inputs, "merge_bytes_read": result.bytes_read,
                      "kernel": result.kernel, "seconds": timings,
                      "torch": "torch" in sys.modules}), file=sys.stderr)


def command(tool: str, root: Path, k: int, args: argparse.Namespace) -> list[str]:
    """argv of `METHOD@s3` (the merge_throughput tool name of this column)."""
    method = tool.removesuffix("@s3")
    return [sys.executable, str(Path(__file__).resolve()), "child", "--k", str(k),
            "--method", method, "--out", str(root / f"out-{method}-s3-{k}"),
            "--scratch", str(root / f"scratch-s3-{k}"), "--threads", str(args.threads),
            "--shard-mb", str(args.shard_mb)]


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    for flag in ("--method", "--out", "--scratch"):
        c.add_argument(flag, required=True)
    c.add_argument("--k", type=int, required=True)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--shard-mb", type=int, default=500)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    child(args)


if __name__ == "__main__":
    main()
