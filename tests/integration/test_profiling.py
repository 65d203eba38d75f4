"""The profile stage end to end on real tiny models: planted conflicts, outputs, CLI, sites."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from merit_trainer.profiling import profile_to_dir, run_profile_stage
from merit_trainer.profiling.cli import main as profile_main
from meritrun.api import DataSpec, PartitioningSpec, ProfilingSpec
from meritrun.data import group_by_source, iter_examples, write_examples
from meritrun.errors import SpecError
from meritrun.stages import Plan, ProfileParams, StorageParams
from meritrun.synthetic import PLANTED_CONFLICT_SOURCES, TASKS, make_mixture
from meritrun.textenc import collate, encode_example, token_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _warm_up(src: Path, dst: Path, *, steps: int = 40) -> Path:
    """A few AdamW steps on every task: at a random init the gradients mostly say which
    characters a source outputs; once the model knows the formats, the two "map:" families
    pull the same context in opposite directions, which is the conflict MERIT looks for."""
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    broad, _ = make_mixture([(f"warm-{t}", t) for t in TASKS], train=64, held_out=0, seed=99)
    encoded = [encode_example(tok, ex, max_len=64) for ex in broad]
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        summed, count = token_losses(model, collate(rng.sample(encoded, 16),
                                                    pad_id=tok.pad_token_id))
        opt.zero_grad()
        (summed.sum() / count.sum()).backward()
        opt.step()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def warm_base(tiny_base, tmp_path_factory) -> Path:
    return _warm_up(tiny_base, tmp_path_factory.mktemp("warm") / "base")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    train, _ = make_mixture(PLANTED_CONFLICT_SOURCES, train=60, held_out=0, seed=0)
    path = tmp_path_factory.mktemp("planted") / "train.jsonl"
    write_examples(path, train)
    return path


PROFILING = ProfilingSpec(stride=1, calibration_samples=32, parameters="attention")


def test_planted_conflict_families_land_on_opposite_sides(warm_base, planted, tmp_path):
    examples = group_by_source(iter_examples(planted))
    plan = profile_to_dir(examples, warm_base, tmp_path, profiling=PROFILING,
                          partitioning=PartitioningSpec(axes=2, seed=0))
    first = {s: v[0] for s, v in plan.scores.items()}
    rev = {np.sign(first[s]) for s in ("map-rev-a", "map-rev-b")}
    up = {np.sign(first[s]) for s in ("map-up-a", "map-up-b")}
    assert len(rev) == 1 and len(up) == 1 and rev != up, first
    left = {s for p in plan.partitions[:2] for s in p.sources}
    right = {s for p in plan.partitions[2:] for s in p.sources}
    families = [{"map-rev-a", "map-rev-b"}, {"map-up-a", "map-up-b"}]
    assert any(f <= left and g <= right for f, g in (families, families[::-1])), plan.partitions
    assert plan.explained_variance[0] > plan.explained_variance[1] > 0
    # same seed, same plan (the whole pipeline is deterministic)
    again = profile_to_dir(examples, warm_base, tmp_path / "again", profiling=PROFILING,
                           partitioning=PartitioningSpec(axes=2, seed=0))
    assert again.partitions == plan.partitions
    assert np.allclose([again.scores[s] for s in first], [plan.scores[s] for s in first])


def _png_ok(data: bytes) -> bool:
    return data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_profile_stage_writes_plan_and_evidence_to_storage(tiny_base, tiny_mixture, tmp_path):
    root = tmp_path / "store"
    params = ProfileParams(
        run="demo", run_uid="u1", attempt=1, storage=StorageParams(uri=root.as_uri()),
        base_model=str(tiny_base), output="runs/demo/plan/attempt-1",
        data=DataSpec(uri=tiny_mixture.train.as_uri()),
        profiling=ProfilingSpec(calibration_samples=8, stride=5, projection_dim=1024),
        partitioning=PartitioningSpec(axes=1),
    )
    plan = run_profile_stage(params, workdir=tmp_path / "work")
    out = root / "runs/demo/plan/attempt-1"
    assert Plan.model_validate_json((out / "plan.json").read_text()) == plan
    c = np.load(out / "conflict.npy")
    assert c.shape == (4, 4) and np.allclose(np.diag(c), 1)
    assert np.load(out / "sketch.npy").shape == (4, 1024)
    assert _png_ok((out / "conflict.png").read_bytes()) and _png_ok((out / "pca.png").read_bytes())

    assert sorted(s for p in plan.partitions for s in p.sources) == sorted(tiny_mixture.sources)
    assert len(plan.partitions) == 2 and plan.strategy == "conflictPCA"
    assert sum(p.tokens for p in plan.partitions) == sum(plan.source_tokens.values())
    # token counts match an independent count with the training encoder (one epoch, 512)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = group_by_source(iter_examples(tiny_mixture.train))
    expected = {s: sum(encode_example(tok, ex, max_len=512).supervised for ex in exs)
                for s, exs in examples.items()}
    assert plan.source_tokens == expected
    s = plan.settings
    assert s["centered"] is True and s["projection_dim"] == 1024 and s["parameters"] == "attention"
    assert s["calibration"] == {name: 8 for name in tiny_mixture.sources}  # 40 / 5 = 8 strided
    assert s["calibration_short"] == []
    assert set(plan.scores) == set(tiny_mixture.sources)


def test_by_site_keeps_remote_sources_at_their_site(tiny_base, tiny_mixture, tmp_path):
    groups = group_by_source(iter_examples(tiny_mixture.train))
    files = {}
    for name, exs in groups.items():
        files[name] = tmp_path / f"{name}.jsonl"
        write_examples(files[name], exs)
    sources = [{"name": n, "uri": str(files[n])} for n in groups]
    sources.append({"name": "secret", "site": "site-b"})  # its data never leaves site-b
    params = ProfileParams(
        run="sites", run_uid="u1", attempt=2,
        storage=StorageParams(uri=(tmp_path / "store").as_uri()),
        base_model=str(tiny_base), output="plan",
        data=DataSpec(sources=sources), sites={"copy": "site-b"},
        profiling=ProfilingSpec(calibration_samples=4),
        partitioning=PartitioningSpec(strategy="bySite", partitions=3),
    )
    plan = run_profile_stage(params, workdir=tmp_path / "work")
    at = {site: {s for p in plan.partitions if p.site == site for s in p.sources}
          for site in (None, "site-b")}
    assert at == {"site-b": {"copy", "secret"}, None: {"sort", "reverse", "upper"}}
    assert len(plan.partitions) == 3  # the hub's larger token mass gets the spare partition
    assert plan.settings["tokens_unknown"] == ["secret"] and plan.source_tokens["secret"] == 0
    assert plan.settings["within_site"] == "tokens"
    assert (tmp_path / "store/plan/plan.json").is_file()
    assert not (tmp_path / "store/plan/conflict.npy").exists()  # no gradients were taken

    conflict = params.model_copy(update={"partitioning": PartitioningSpec(axes=1)})
    with pytest.raises(SpecError, match="'secret'"):
        run_profile_stage(conflict, workdir=tmp_path / "work2")


def test_cli_writes_the_outputs_and_prints_the_plan(warm_base, planted, tmp_path, capsys):
    out = tmp_path / "profile"
    code = profile_main(["--base", str(warm_base), "--data", str(planted), "--axes", "1",
                         "--out", str(out), "--samples", "32", "--stride", "1",
                         "--dim", "2048", "--uncentered", "--seed", "3"])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["partitions"]) == 2 and plan["settings"]["centered"] is False
    assert plan["settings"]["projection_dim"] == 2048 and plan["settings"]["sketch_seed"] == 3
    for name in ("conflict.png", "pca.png"):
        assert _png_ok((out / name).read_bytes())
    assert (out / "conflict.npy").is_file() and (out / "sketch.npy").is_file()
    printed = capsys.readouterr().out
    assert "p0" in printed and "p1" in printed and "axis 1:" in printed
    for name in ("map-rev-a", "count"):
        assert name in printed

    bad = profile_main(["--base", str(warm_base), "--data", str(planted), "--axes", "1",
                        "--out", str(tmp_path / "bad"), "--parameters", "(["])
    assert bad == 1 and "invalid parameter regex" in capsys.readouterr().err
