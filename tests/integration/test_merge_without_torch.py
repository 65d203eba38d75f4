"""A merge that takes the fused pass never imports torch (about 3 s of a 6 s 1B merge).

Each merge runs in a fresh Python process (torch, once imported, stays), which reports
whether `torch` is in sys.modules when the merge is done: through `merge_models` and through
the `meritrun merge` CLI (verification scan, merge, report, model card). The fused outputs
must equal, byte for byte, those of the same merge forced onto the torch pass (as
test_merge_fused forces it: `fusedmerge.unsupported` gives a reason); a merge that needs
torch (DARE: whole tensors, no fused kernel; a LoRA partition) still runs in the same kind
of process, importing torch itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.experts import make_experts, make_lora_adapter, save_state, write_partition

from merit_merger.sources import PartitionSource
from meritrun.api import MergeSpec
from meritrun.stages import MergeParams, PartitionInput, StorageParams

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


CLI = """
import json, sys

args = json.loads(sys.argv[1])
from merit_merger import fusedmerge
from meritrun.cli import main

if args["force_torch"]:
    fusedmerge.unsupported = lambda *a, **k: "forced by the test"
code = main(["merge", *args["argv"]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


STAGE = """
import json, sys

args = json.loads(sys.argv[1])
from merit_merger.stage import main

code = main(["merge", "--params", args["params"], "--workdir", args["workdir"]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
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


def in_a_process(script: str, args: dict) -> dict:
    """Run `script` with `args` in a fresh interpreter; what it printed last, as JSON."""
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=os.environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge_in_a_process(base: Path, parts: list[PartitionSource], out: Path, method: str,
                       params: dict, *, force_torch: bool = False) -> dict:
    return in_a_process(MERGE, {"base": str(base), "out": str(out), "method": method,
                                "params": params, "force_torch": force_torch,
                                "parts": [(p.name, str(p.model_dir), p.tokens) for p in parts]})


def cli_merge_in_a_process(argv: list[str], *, force_torch: bool = False) -> dict:
    return in_a_process(CLI, {"argv": argv, "force_torch": force_torch})


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


@pytest.mark.parametrize("method,extra", [("token-weighted", []),
                                          ("task-arithmetic", ["--scale", "0.5"])])
def test_the_merge_cli_verifies_merges_and_reports_without_torch(tiny_base, tmp_path, method,
                                                                 extra):
    artifacts = make_experts(tmp_path / "parts", tiny_base, 2, moments_kind=None).artifacts
    runs = {}
    for force_torch in (False, True):
        out = tmp_path / f"out-{force_torch}"
        argv = ["--method", method, *extra, "--base", str(tiny_base), "--out", str(out),
                *map(str, artifacts)]
        runs[force_torch] = cli_merge_in_a_process(argv, force_torch=force_torch)
    assert runs == {False: {"code": 0, "torch": False}, True: {"code": 0, "torch": True}}
    report = json.loads((tmp_path / "out-False" / "merge_report.json").read_text())
    assert report["included"] == ["p0", "p1"] and report["io"]["kernel"] == "fused"
    assert all(p["update_norm"] > 0 for p in report["partitions"])  # the numpy scan's
    got = shard_bytes(tmp_path / "out-False" / "model")
    assert got and got == shard_bytes(tmp_path / "out-True" / "model")


def test_the_merge_cli_takes_torch_for_a_lora_partition(tiny_base, tmp_path):
    adapter = make_lora_adapter(tmp_path / "adapter", tiny_base, r=4, targets=("q_proj",))
    lora = write_partition(tmp_path / "parts", "lora", base_dir=tiny_base, adapter_dir=adapter)
    out = tmp_path / "out"
    ran = cli_merge_in_a_process(["--base", str(tiny_base), "--out", str(out), str(lora)])
    assert ran == {"code": 0, "torch": True}
    report = json.loads((out / "merge_report.json").read_text())
    assert report["included"] == ["lora"] and report["io"]["kernel"] == "torch"


def test_the_merge_stage_with_staged_inputs_merges_without_torch(tiny_base, tmp_path,
                                                                 monkeypatch):
    """MERITRUN_INPUTS=stage: downloaded (here: copied from a file:// root), sha256-checked,
    scanned, merged and uploaded (streamed inputs, from S3: test_merge_streamed)."""
    root = tmp_path / "store"
    shutil.copytree(tiny_base, root / "base")
    for a in make_experts(tmp_path / "parts", tiny_base, 2, moments_kind=None).artifacts:
        shutil.copytree(a, root / "parts" / a.name)
    params = MergeParams(
        run="r1", run_uid="u1", attempt=1, storage=StorageParams(uri=root.as_uri()),
        base_model=(root / "base").as_uri(), output="merged", merge=MergeSpec(),
        partitions=[PartitionInput(name=p, prefix=f"parts/{p}") for p in ("p0", "p1")])
    (tmp_path / "params.json").write_text(params.model_dump_json())
    monkeypatch.setenv("MERITRUN_INPUTS", "stage")
    ran = in_a_process(STAGE, {"params": str(tmp_path / "params.json"),
                               "workdir": str(tmp_path / "work")})
    assert ran == {"code": 0, "torch": False}
    report = json.loads((root / "merged" / "merge_report.json").read_text())
    assert report["included"] == ["p0", "p1"] and report["io"]["kernel"] == "fused"
