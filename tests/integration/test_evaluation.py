"""Held-out evaluation on a real tiny Qwen2, checked against plain per-example loops."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from merit_merger import cli_eval
from merit_merger.evaluation import evaluate_dir, evaluate_model, format_eval_table, load_model
from meritrun.data import Turn, group_by_source, read_examples
from meritrun.textenc import render_context

MAX_NEW = 6


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base):
    torch.manual_seed(0)
    return load_model(tiny_base)


@pytest.fixture(scope="module")
def held_out(tiny_mixture):
    return read_examples([tiny_mixture.held_out])


def plain_loss(model, tokenizer, example) -> tuple[float, int]:
    """Summed loss and supervised tokens of one example, via the model's own loss."""
    context = tokenizer(render_context(tokenizer, example), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    response.append(tokenizer.eos_token_id)
    ids = torch.tensor([context + response])
    labels = torch.tensor([[-100] * len(context) + response])
    with torch.no_grad():
        mean = model(input_ids=ids, labels=labels).loss.item()
    return mean * len(response), len(response)


def plain_greedy(model, tokenizer, example, max_new: int) -> str:
    """Greedy decoding one token at a time, no batching, no cache, no generate()."""
    ids = tokenizer(render_context(tokenizer, example), add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_loss_per_source_matches_a_plain_loop(model_and_tokenizer, held_out):
    model, tokenizer = model_and_tokenizer
    result = evaluate_model(model, tokenizer, held_out, batch_size=3, generate=False)
    assert list(result.sources) == list(group_by_source(held_out))
    total_loss = total_tokens = 0.0
    for source, examples in group_by_source(held_out).items():
        sums = [plain_loss(model, tokenizer, ex) for ex in examples]
        loss, tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
        got = result.sources[source]
        assert (got.examples, got.skipped, got.tokens) == (len(examples), 0, tokens)
        assert got.mean_loss == pytest.approx(loss / tokens, rel=1e-5)
        assert got.perplexity == pytest.approx(math.exp(loss / tokens), rel=1e-5)
        assert got.accuracy is None
        total_loss, total_tokens = total_loss + loss, total_tokens + tokens
    assert result.micro_loss == pytest.approx(total_loss / total_tokens, rel=1e-5)
    assert result.macro_loss == pytest.approx(
        sum(s.mean_loss for s in result.sources.values()) / len(result.sources), rel=1e-9)
    assert result.macro_loss != pytest.approx(result.micro_loss, rel=1e-6)  # sizes differ


def test_examples_truncated_to_nothing_are_skipped(model_and_tokenizer, held_out):
    model, tokenizer = model_and_tokenizer
    limit = 17
    result = evaluate_model(model, tokenizer, held_out, max_seq_len=limit, generate=False)
    for source, examples in group_by_source(held_out).items():
        contexts = [len(tokenizer(render_context(tokenizer, ex), add_special_tokens=False)
                        ["input_ids"]) for ex in examples]
        skipped = sum(1 for n in contexts if n >= limit)
        assert result.sources[source].skipped == skipped
        assert result.sources[source].examples == len(examples) - skipped
    assert sum(s.skipped for s in result.sources.values()) > 0
    assert sum(s.examples for s in result.sources.values()) > 0


def test_batched_generation_and_exact_match_equal_a_plain_greedy_loop(model_and_tokenizer,
                                                                      held_out):
    model, tokenizer = model_and_tokenizer
    subset = [ex for exs in group_by_source(held_out).values() for ex in exs[:5]]
    plain = [plain_greedy(model, tokenizer, ex, MAX_NEW) for ex in subset]
    # Plant right answers: every other example's reference becomes the model's own output
    # (padded with spaces, which exact match strips), so accuracy is known exactly.
    planted = [replace(ex, turns=(*ex.turns[:-1], Turn("assistant", f" {text}\n")))
               if i % 2 == 0 else ex
               for i, (ex, text) in enumerate(zip(subset, plain, strict=True))]
    result = evaluate_model(model, tokenizer, planted, batch_size=4, max_new_tokens=MAX_NEW)
    by_source: dict[str, list[int]] = {}
    for i, ex in enumerate(planted):
        by_source.setdefault(ex.source, []).append(i)
    assert result.predictions == {s: [plain[i] for i in idx] for s, idx in by_source.items()}
    correct = 0
    for source, idx in by_source.items():
        hits = sum(plain[i].strip() == planted[i].response.strip() for i in idx)
        assert 0 < hits < len(idx)
        assert result.sources[source].accuracy == pytest.approx(hits / len(idx))
        correct += hits
    assert result.micro_accuracy == pytest.approx(correct / len(planted))


def test_evaluate_dir_table_and_json(tiny_base, tiny_mixture, model_and_tokenizer, held_out):
    model, tokenizer = model_and_tokenizer
    direct = evaluate_model(model, tokenizer, held_out, generate=False)
    result = evaluate_dir(tiny_base, tiny_mixture.held_out, generate=False)
    assert result.micro_loss == pytest.approx(direct.micro_loss, rel=1e-6)
    table = format_eval_table(result).splitlines()
    assert [line.split()[0] for line in table if not line.startswith("-")] == [
        "source", *tiny_mixture.sources, "macro", "micro"]
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["micro"]["mean_loss"] == pytest.approx(direct.micro_loss, rel=1e-6)
    assert set(doc["sources"]) == set(tiny_mixture.sources)


def test_cli_eval_prints_the_table_and_writes_json(tiny_base, tiny_mixture, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    argv = [str(tiny_base), "--data", str(tiny_mixture.held_out), "--max-new-tokens", "2",
            "--batch-size", "20", "--json", str(out)]
    assert cli_eval.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(source in printed for source in tiny_mixture.sources) and "macro" in printed
    doc = json.loads(out.read_text())
    assert doc["macro"]["accuracy"] is not None
    assert {s: len(p) for s, p in doc["predictions"].items()} == {
        s: 10 for s in tiny_mixture.sources}


def test_cli_eval_refuses_a_directory_without_a_model(tmp_path, tiny_mixture, capsys):
    assert cli_eval.main([str(tmp_path), "--data", str(tiny_mixture.held_out)]) == 2
    assert "no config.json" in capsys.readouterr().err
