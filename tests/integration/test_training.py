"""Partition training on a real tiny Qwen2: artifact, token counts, moments, LoRA, resume.

Every run writes to a `file://` storage root and is checked through what landed there, the
way the merger will see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merit_trainer.checkpoint import batch_indices, lr_factor, plan_steps
from merit_trainer.moments import dense_second_moment, load_second_moments
from merit_trainer.sources import load_partition_examples
from merit_trainer.training import train_partition
from meritrun.api import DataSpec
from meritrun.artifacts import (
    RunId,
    base_fingerprint,
    partition_prefix,
    read_manifest,
    sha256_file,
)
from meritrun.data import read_examples
from meritrun.errors import DataError
from meritrun.stages import TrainParams
from meritrun.textenc import encode_example

SOURCES = ["copy", "sort"]
EPOCHS = 2
TRAINING = {"learningRate": 3e-3, "epochs": EPOCHS, "batchSize": 8, "maxSeqLen": 64,
            "secondMoments": "full", "seed": 5}


@dataclass(frozen=True)
class Run:
    params: TrainParams
    workdir: Path
    artifact: Path  # where the artifact landed in storage


def make_params(tmp: Path, base: Path, data: Path, *, attempt: int = 1,
                **training) -> TrainParams:
    return TrainParams(
        run="demo", run_uid="u1", attempt=attempt, storage={"uri": (tmp / "store").as_uri()},
        base_model=str(base), output=partition_prefix(RunId("demo", "u1"), "p1", attempt),
        partition="p1",
        index=1, sources=SOURCES, data={"uri": str(data)}, training={**TRAINING, **training},
    )


def train(tmp: Path, base: Path, data: Path, *, progress=None, every=5, attempt: int = 1,
          **training) -> Run:
    params = make_params(tmp, base, data, attempt=attempt, **training)
    train_partition(params, workdir=tmp / "work", progress=progress, checkpoint_every=every)
    return Run(params, tmp / "work", tmp / "store" / params.output)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one thread; two fight other processes for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full_run(one_torch_thread, tmp_path_factory, tiny_base, tiny_mixture) -> Run:
    return train(tmp_path_factory.mktemp("full"), tiny_base, tiny_mixture.train)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_artifact_is_uploaded_with_a_verifiable_manifest(full_run, tiny_base, tiny_mixture):
    manifest = read_manifest(full_run.artifact)
    assert (manifest.run, manifest.partition, manifest.attempt) == ("demo", "p1", 1)
    assert manifest.sources == SOURCES and manifest.weights == "full"
    assert manifest.base == base_fingerprint(tiny_base)
    assert manifest.training["seed"] == 5 + 1  # base seed + partition index
    uploaded = {p.relative_to(full_run.artifact).as_posix()
                for p in full_run.artifact.rglob("*") if p.is_file()}
    # progress.json is for watching a running stage: removed once the artifact is published
    assert uploaded - set(manifest.files) == {"manifest.json"}
    assert not (full_run.workdir / "checkpoints").exists() or not any(
        (full_run.workdir / "checkpoints").iterdir())  # removed once published
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json",
            "optimizer_v.safetensors", "train_log.json", "loss.png"} <= set(manifest.files)
    for rel, entry in manifest.files.items():
        path = full_run.artifact / rel
        assert (sha256_file(path), path.stat().st_size) == (entry.sha256, entry.bytes), rel


def test_tokens_are_the_supervised_tokens_fed_over_all_epochs(full_run, tiny_base, tiny_mixture):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    examples = [e for e in read_examples([tiny_mixture.train]) if e.source in SOURCES]
    encoded = [encode_example(tokenizer, e, max_len=64) for e in examples]
    tokens = read_manifest(full_run.artifact).tokens
    assert tokens.supervised == EPOCHS * sum(e.supervised for e in encoded) > 0
    assert tokens.total == EPOCHS * sum(len(e.input_ids) for e in encoded) > tokens.supervised
    assert "supervised" in tokens.definition


def test_trained_weights_moved_and_load_with_from_pretrained(full_run, tiny_base):
    base, trained = _weights(tiny_base), _weights(full_run.artifact / "model")
    assert set(trained) == set(base)
    assert all(torch.isfinite(t).all() for t in trained.values())
    moved = [n for n in base if not torch.equal(base[n], trained[n])]
    assert len(moved) == len(base)
    model = AutoModelForCausalLM.from_pretrained(full_run.artifact / "model")
    assert torch.equal(dict(model.named_parameters())["lm_head.weight"], trained["lm_head.weight"])


def test_loss_decreases_and_is_logged(full_run):
    log = json.loads((full_run.artifact / "train_log.json").read_text())
    losses = log["loss"]
    assert len(losses) == log["steps"] == EPOCHS * 10  # 80 examples, batch 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert (full_run.artifact / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_full_second_moments_cover_every_weight(full_run):
    kind, entries, meta = load_second_moments(full_run.artifact / "optimizer_v.safetensors")
    assert kind == "full" and meta["step"] == "20" and meta["bias_corrected"] == "false"
    assert read_manifest(full_run.artifact).second_moments.step == 20
    weights = _weights(full_run.artifact / "model")
    assert set(entries) == set(weights)
    for name, v in entries.items():
        assert v.shape == weights[name].shape and (v > 0).any(), name


def test_same_seed_gives_identical_weights_and_rank1_factors(full_run, tmp_path, tiny_base,
                                                             tiny_mixture):
    # Only the saved moment kind differs, which must not change training at all.
    run = train(tmp_path, tiny_base, tiny_mixture.train, secondMoments="rank1")
    first, second = _weights(full_run.artifact / "model"), _weights(run.artifact / "model")
    assert all(torch.equal(first[n], second[n]) for n in first)
    _, full, _ = load_second_moments(full_run.artifact / "optimizer_v.safetensors")
    kind, entries, _ = load_second_moments(run.artifact / "optimizer_v.safetensors")
    assert kind == "rank1" and set(entries) == set(full)
    for name, v in full.items():
        if v.ndim == 1:
            assert torch.equal(entries[name], v)
            continue
        row, col, total = entries[name]
        torch.testing.assert_close(row, v.reshape(v.shape[0], -1).sum(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(col, v.reshape(v.shape[0], -1).sum(0), rtol=1e-5, atol=0)
        torch.testing.assert_close(total, v.sum().reshape(1), rtol=1e-5, atol=0)


def test_interrupted_run_resumes_from_its_checkpoint(full_run, tmp_path, tiny_base,
                                                     tiny_mixture):
    class Preempted(Exception):
        pass

    def preempt_at_7(step, total, loss):
        if step == 7:
            raise Preempted

    with pytest.raises(Preempted):
        train(tmp_path, tiny_base, tiny_mixture.train, progress=preempt_at_7)
    [meta] = (tmp_path / "work" / "checkpoints").glob("*/step-*/meta.json")
    assert json.loads(meta.read_text())["step"] == 5  # checkpoint_every=5; 6 and 7 are redone
    assert not list((tmp_path / "store").rglob("manifest.json"))  # nothing published yet

    seen: list[int] = []  # the next attempt of the same partition and configuration resumes
    run = train(tmp_path, tiny_base, tiny_mixture.train, attempt=2,
                progress=lambda step, total, loss: seen.append(step))
    assert seen[0] == 6 and seen[-1] == 20
    resumed, uninterrupted = _weights(run.artifact / "model"), _weights(full_run.artifact / "model")
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)
    assert read_manifest(run.artifact).tokens == read_manifest(full_run.artifact).tokens
    log = json.loads((run.artifact / "train_log.json").read_text())
    assert log["loss"] == json.loads((full_run.artifact / "train_log.json").read_text())["loss"]


def test_lora_run_produces_an_adapter_peft_loads(tmp_path, tiny_base, tiny_mixture):
    from peft import PeftModel

    run = train(tmp_path, tiny_base, tiny_mixture.train, method="lora", maxSteps=6,
                secondMoments="rank1", lora={"rank": 4, "alpha": 8.0})
    manifest = read_manifest(run.artifact)
    model_dir = run.artifact / "model"
    assert manifest.weights == "lora" and manifest.training["steps"] == 6
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()}
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapter.items())  # B starts at 0
    _, entries, _ = load_second_moments(run.artifact / "optimizer_v.safetensors")
    assert set(entries) == set(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    q_before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_before)


def test_sources_from_separate_files_and_missing_sources(tmp_path, tiny_mixture):
    examples = read_examples([tiny_mixture.train])
    (tmp_path / "sort.jsonl").write_text("".join(
        json.dumps({"source": "sort", "prompt": e.prompt, "response": e.response}) + "\n"
        for e in examples if e.source == "sort"))
    data = DataSpec(uri=str(tiny_mixture.train),
                    sources=[{"name": "sort", "uri": str(tmp_path / "sort.jsonl")},
                             {"name": "upper", "site": "site-b"}])
    got = load_partition_examples(data, ["sort", "copy", "sort"], tmp_path / "cache")
    assert list(got) == ["sort", "copy"] and len(got["sort"]) == len(got["copy"]) == 40
    with pytest.raises(DataError, match="'nope'"):
        load_partition_examples(data, ["copy", "nope"], tmp_path / "cache")
    only_files = DataSpec(sources=[{"name": "upper", "site": "site-b"}])
    with pytest.raises(DataError, match="site 'site-b'"):
        load_partition_examples(only_files, ["upper"], tmp_path / "cache")


def test_the_merger_reads_the_rank1_file_the_trainer_writes(full_run, tmp_path):
    from merit_merger.moments import MomentReader
    from merit_trainer.moments import save_second_moments

    _, full, _ = load_second_moments(full_run.artifact / "optimizer_v.safetensors")
    path = save_second_moments(tmp_path / "v.safetensors", full, kind="rank1", beta2=0.999,
                               step=20)
    _, entries, _ = load_second_moments(path)
    reader = MomentReader(path)
    try:
        for name, v in full.items():
            reader.check(name, tuple(v.shape))
            torch.testing.assert_close(reader.read(name, tuple(v.shape)),
                                       dense_second_moment(entries[name], v.shape))
    finally:
        reader.close()


def test_step_plan_schedule_and_batch_order():
    plan = plan_steps(20, batch_size=8, epochs=1.5, max_steps=None, warmup_ratio=0.25)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (3, 5, 2)
    assert [lr_factor(s, plan) for s in range(5)] == pytest.approx([0.5, 1, 1, 2 / 3, 1 / 3])
    assert plan_steps(20, batch_size=8, epochs=3, max_steps=4).total_steps == 4
    assert plan_steps(30, batch_size=1, epochs=0.1, max_steps=None).total_steps == 3
    epoch0 = [batch_indices(s, n=20, batch_size=8, seed=1) for s in range(3)]
    assert [len(b) for b in epoch0] == [8, 8, 4]
    assert sorted(i for b in epoch0 for i in b) == list(range(20))
    assert batch_indices(3, n=20, batch_size=8, seed=1) != epoch0[0]  # reshuffled per epoch
    assert batch_indices(0, n=20, batch_size=8, seed=2) != epoch0[0]  # seeded
    assert batch_indices(0, n=20, batch_size=8, seed=1) == epoch0[0]


def test_micro_batches_and_checkpointing_train_the_same_model(tmp_path, tiny_base, tiny_mixture):
    # fp32 on a GPU too: bf16 (auto there) rounds each micro-batch's sums differently
    plain = train(tmp_path / "a", tiny_base, tiny_mixture.train, maxSteps=4, every=0,
                  precision="fp32")
    split = train(tmp_path / "b", tiny_base, tiny_mixture.train, maxSteps=4, every=0,
                  microBatchSize=2, gradientCheckpointing=True, precision="fp32")
    log_a, log_b = (json.loads((r.artifact / "train_log.json").read_text())
                    for r in (plain, split))
    assert log_a["loss"][0] == pytest.approx(log_b["loss"][0], rel=1e-5)  # same first batch
    assert read_manifest(plain.artifact).tokens == read_manifest(split.artifact).tokens
    a, b = _weights(plain.artifact / "model"), _weights(split.artifact / "model")
    base = _weights(tiny_base)
    # Same gradients up to float rounding (the losses agree to 1e-7); Adam turns rounding in
    # near-zero gradients into visible element-wise noise, so compare whole updates.
    for n in a:
        if not n.endswith("k_proj.bias"):  # true gradient 0 (softmax shift invariance)
            update = (a[n] - base[n]).norm()
            assert (b[n] - a[n]).norm() / update < 1e-3, n


def test_progress_file_has_the_shape_the_status_display_reads(tmp_path, tiny_base, tiny_mixture):
    from merit_trainer.publishing import ProgressFile

    params = make_params(tmp_path, tiny_base, tiny_mixture.train)
    reporter = ProgressFile(params, enabled=True)
    reporter.update(3, 20, 1.5)
    reporter.update(4, 20, 1.4)  # within 2 s of the last write: skipped
    path = tmp_path / "store" / params.output / "progress.json"
    progress = json.loads(path.read_text())
    assert set(progress) == {"stage", "step", "total", "loss", "updated"}
    assert (progress["stage"], progress["step"], progress["total"]) == ("train", 3, 20)
    reporter.update(20, 20, 1.0)  # the last step is always written
    assert json.loads(path.read_text())["step"] == 20
