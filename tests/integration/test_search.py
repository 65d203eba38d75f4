"""Mixture search on real tiny Qwen2 experts whose best mixture is planted by construction.

The experts are theta_i = theta* + r_i with sum_i w*_i r_i = 0, where theta* is the base
briefly fine-tuned on the held-out tasks and r_1, r_2 are large random directions. Then the
proxy at w is theta* + sum_i (w_i - w*_i) r_i: exactly theta* at w* and a random perturbation
of it everywhere else, so w* is the best lattice point. (theta_i - theta0 = (theta* - theta0)
+ r_i: each expert still looks like a fine-tune of the base.)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merit_merger import cli_search
from merit_merger.cli_search import run_search_stage
from merit_merger.evaluation import load_model
from merit_merger.search import MergeProxy, load_expert_state, search_mixtures, simplex_grid
from meritrun.api import MixtureSearchSpec
from meritrun.artifacts import (
    PartitionManifest,
    RunId,
    TokenCounts,
    base_fingerprint,
    hash_tree,
    partition_prefix,
    search_prefix,
    write_manifest,
)
from meritrun.data import write_examples
from meritrun.errors import ContributionRejected
from meritrun.stages import PartitionInput, SearchParams, StorageParams
from meritrun.storage import open_storage
from meritrun.synthetic import make_mixture
from meritrun.textenc import collate, encode_example, token_losses

W_STAR = (0.125, 0.625, 0.25)
NAMES = ["p0", "p1", "p2"]
SOURCES = [("copy", "copy"), ("reverse", "reverse"), ("add", "add")]
RANDOM_SCALE = 4.0  # r_i in units of each tensor's std: large enough to dominate the gradient


@dataclass(frozen=True)
class Planted:
    base: Path
    artifacts: list[Path]  # partition artifact dirs (manifest.json + model/)
    held_out: Path
    tokens: int


def fine_tune(model, tokenizer, examples, *, steps: int) -> None:
    encoded = [encode_example(tokenizer, ex, max_len=128) for ex in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(encoded), (16,), generator=gen).tolist()
        losses, counts = token_losses(model, collate([encoded[i] for i in idx],
                                                     pad_id=tokenizer.pad_token_id))
        opt.zero_grad()
        (losses.sum() / counts.sum()).backward()
        opt.step()
    model.eval()


def write_artifact(out: Path, model, tokenizer, *, name: str, base: Path, tokens: int) -> Path:
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_manifest(out, PartitionManifest(
        run="t", partition=name, attempt=1, sources=[name], base=base_fingerprint(base),
        tokens=TokenCounts(supervised=tokens, total=2 * tokens), files=hash_tree(out)))
    return out


@pytest.fixture(scope="module")
def planted(tiny_base, tmp_path_factory) -> Planted:
    root = tmp_path_factory.mktemp("planted")
    train, held = make_mixture(SOURCES, train=64, held_out=8, seed=0)
    write_examples(root / "held_out.jsonl", held)
    torch.manual_seed(0)
    base, tokenizer = load_model(tiny_base)
    star = copy.deepcopy(base)
    fine_tune(star, tokenizer, train, steps=30)
    theta0 = dict(base.named_parameters())
    gen = torch.Generator().manual_seed(1)
    experts = [copy.deepcopy(star) for _ in NAMES]
    with torch.no_grad():
        for name, p in star.named_parameters():
            scale = RANDOM_SCALE * (p.std() if p.numel() > 1 else p.abs() + 1)
            r1, r2 = (torch.randn(p.shape, generator=gen) * scale for _ in range(2))
            r3 = -(W_STAR[0] * r1 + W_STAR[1] * r2) / W_STAR[2]
            for expert, r in zip(experts, (r1, r2, r3), strict=True):
                dict(expert.named_parameters())[name].add_(r)
            assert not torch.equal(p, theta0[name])
    artifacts = [write_artifact(root / n, e, tokenizer, name=n, base=tiny_base, tokens=1000)
                 for n, e in zip(NAMES, experts, strict=True)]
    return Planted(tiny_base, artifacts, root / "held_out.jsonl", 1000)


def test_proxy_is_the_expert_at_a_vertex_and_the_token_weighted_merge_at_uniform(planted):
    proxy, _ = MergeProxy.from_dirs(planted.base, [a / "model" for a in planted.artifacts])
    experts = [load_file(a / "model" / "model.safetensors") for a in planted.artifacts]
    pointers = {n: p.data_ptr() for n, p in proxy.model.named_parameters()}
    for i, expert in enumerate(experts):
        model = proxy.load([1.0 if j == i else 0.0 for j in range(3)])
        assert model is proxy.model
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.data, expert[name], rtol=1e-6, atol=2e-6)
    # Token-weighted merge with equal token counts, element by element from the files.
    tokens = [planted.tokens] * 3
    merged = {name: sum(n * e[name] for n, e in zip(tokens, experts, strict=True)) / sum(tokens)
              for name in experts[0]}
    model = proxy.load([1 / 3] * 3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.data, merged[name], rtol=1e-5, atol=1e-5)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers  # in place


@pytest.mark.parametrize("objective", ["mean-loss", "weighted"])
def test_search_finds_the_planted_mixture(planted, objective):
    result = search_mixtures(base_dir=planted.base, expert_dirs=planted.artifacts, names=NAMES,
                             eval_path=planted.held_out, candidates=simplex_grid(3),
                             objective=objective, batch_size=32)
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["best"] == dict(zip(NAMES, W_STAR, strict=True))
    ranking = doc["ranking"]
    assert len(ranking) == 21 and [e["rank"] for e in ranking] == list(range(1, 22))
    assert ranking[1]["score"] > ranking[0]["score"] + 0.05  # a clear winner, not a tie
    assert doc["base"]["score"] > ranking[0]["score"]  # theta* is trained, theta0 is not
    assert all(e["accuracy"] is None for e in ranking)  # loss objectives skip generation


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_expert_is_merged_before_it_becomes_a_delta(planted, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(planted.base)
    torch.manual_seed(2)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    proxy, _ = MergeProxy.from_dirs(planted.base, [tmp_path / "adapter", planted.artifacts[0]])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        got = proxy.load([1.0, 0.0])(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    state = load_expert_state(tmp_path / "adapter", base_dir=planted.base)
    assert not any("lora" in name for name in state)


def test_cli_search_prints_the_ranking_and_writes_outputs(planted, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--base", str(planted.base), "--experts", *map(str, planted.artifacts[:2]),
            "--eval", str(planted.held_out), "--grid", "8", "--out", str(out)]
    assert cli_search.main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Loading weights" not in captured.err  # no transformers bar per expert/candidate
    doc = json.loads((out / "search.json").read_text())
    assert doc["names"] == NAMES[:2] and doc["candidates"] == 7
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    best = ", ".join(f"{n}={w:.3f}" for n, w in doc["best"].items())
    assert f"best mixture: {best}" in printed
    assert len([line for line in printed.splitlines() if line.strip()[:1].isdigit()]) == 7


def stage_params(root: Path, planted: Planted, **search) -> SearchParams:
    storage = open_storage(root.as_uri())
    parts = []
    for name, art in zip(NAMES, planted.artifacts, strict=True):
        prefix = partition_prefix(RunId("t", "u1"), name, 1)
        storage.upload_dir(art, prefix)
        parts.append(PartitionInput(name=name, prefix=prefix))
    storage.put_file("data/held_out.jsonl", planted.held_out)
    return SearchParams(run="t", run_uid="u1", attempt=1, storage=StorageParams(uri=root.as_uri()),
                        base_model=planted.base.as_uri(), output=search_prefix(RunId("t", "u1"), 1),
                        partitions=parts, held_out=storage.uri_for("data/held_out.jsonl"),
                        search=MixtureSearchSpec(**search))


def test_run_search_stage_on_file_storage_writes_search_json(planted, tmp_path):
    params = stage_params(tmp_path / "store", planted, grid=8)
    returned = run_search_stage(params, workdir=tmp_path / "work")
    storage = open_storage((tmp_path / "store").as_uri())
    doc = json.loads(storage.get_bytes(f"{params.output}/search.json"))
    assert doc["best"] == dict(zip(NAMES, W_STAR, strict=True)) == returned["best"]
    assert doc["objective"] == "mean-loss" and doc["candidates"] == 21
    assert doc["method"] == "grid(1/8)" and doc["run"] == "t" and doc["attempt"] == 1
    assert storage.get_bytes(f"{params.output}/search.png")[:4] == b"\x89PNG"


def test_run_search_stage_refuses_a_partition_trained_from_another_base(planted, tmp_path):
    params = stage_params(tmp_path / "store", planted, dirichlet=3)
    storage = open_storage((tmp_path / "store").as_uri())
    key = f"{params.partitions[1].prefix}/manifest.json"
    manifest = json.loads(storage.get_bytes(key))
    storage.put_bytes(key, json.dumps({**manifest, "base": "sha256:" + "0" * 64}).encode())
    with pytest.raises(ContributionRejected) as err:
        run_search_stage(params, workdir=tmp_path / "work")
    assert (err.value.partition, err.value.check) == ("p1", "base")
    assert not storage.exists(f"{params.output}/search.json")
