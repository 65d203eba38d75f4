"""A merge that takes the fused pass never imports torch (about 3 s of a 6 s 1B merge).

Each merge runs in a fresh Python process (torch, once imported, stays), which reports
whether `torch` is in sys.modules when the merge is done. The fused outputs must equal, byte
for byte, those of the same merge forced onto the torch pass (as test_merge_fused forces
it: `fusedmerge.unsupported` gives a reason); a merge that needs torch (DARE: whole tensors,
no fused kernel) still runs in the same kind of process, importing torch itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.experts import save_state

from merit_merger.sources import PartitionSource

SHAPES = {"embed.weight": (301, 40), "layer.weight": (64, 48), "layer.bias": (65,)}

MERGE = """
import json, sys
from pathlib import Path

args = json.loads(sys.argv[1])
from merit_merger import fusedmerge
from merit_merger.engine import merge_models
from merit_merger.sources import PartitionSource

if args["force_torch"]:
    fusedmerge.unsupported = lambda *a, **k: "forced by the test"
parts = [PartitionSource(name, Path(d), tokens) for name, d, tokens in args["parts"]]
result = merge_models(base_dir=Path(args["base"]), partitions=parts, method=args["method"],
                      params=args["params"], out_dir=Path(args["out"]),
                      shard_size_bytes=20_000, chunk_elements=1000, threads=2)
print(json.dumps({"kernel": result.kernel, "torch": "torch" in sys.modules}))
"""


def write_models(root: Path, dtype: torch.dtype) -> tuple[Path, list[PartitionSource]]:
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    save_state(root / "base", {**{n: t.to(dtype) for n, t in base.items()},
                               "positions": torch.arange(5)}, shard_bytes=20_000)
    parts = []
    for k in range(3):
        state = {n: (t + 0.01 * (k + 1) * torch.randn(t.shape, generator=g)).to(dtype)
                 for n, t in base.items()}
        save_state(root / f"e{k}", {**state, "positions": torch.arange(5)})
        parts.append(PartitionSource(f"e{k}", root / f"e{k}", 1000 * (k + 1)))
    return root / "base", parts


def merge_in_a_process(base: Path, parts: list[PartitionSource], out: Path, method: str,
                       params: dict, *, force_torch: bool = False) -> dict:
    args = {"base": str(base), "out": str(out), "method": method, "params": params,
            "parts": [(p.name, str(p.model_dir), p.tokens) for p in parts],
            "force_torch": force_torch}
    done = subprocess.run([sys.executable, "-c", MERGE, json.dumps(args)], env=os.environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors*"))}


@pytest.mark.parametrize("method,params,dtype", [
    ("token-weighted", {}, torch.bfloat16), ("task-arithmetic", {"scale": 0.4}, torch.float32),
    ("ties", {"density": 0.3}, torch.bfloat16),
])
def test_a_fused_merge_never_imports_torch_and_equals_the_torch_pass(tmp_path, method, params,
                                                                     dtype):
    base, parts = write_models(tmp_path, dtype)
    fused = merge_in_a_process(base, parts, tmp_path / "fused", method, params)
    plain = merge_in_a_process(base, parts, tmp_path / "torch", method, params,
                               force_torch=True)
    assert fused == {"kernel": "fused", "torch": False}
    assert plain == {"kernel": "torch", "torch": True}
    got, want = shard_bytes(tmp_path / "fused"), shard_bytes(tmp_path / "torch")
    assert len(got) > 2 and got == want  # shards and the index


def test_a_merge_that_needs_torch_imports_it_where_it_is_taken(tmp_path):
    base, parts = write_models(tmp_path, torch.bfloat16)
    ran = merge_in_a_process(base, parts, tmp_path / "dare", "dare",
                             {"density": 0.5, "seed": 3})
    assert ran == {"kernel": "torch", "torch": True}
    assert shard_bytes(tmp_path / "dare")
