"""Held-out evaluation per source: supervised loss, perplexity and exact-match accuracy.

Used by `meritrun eval`, the mixture search (every candidate proxy is scored here), the merge
report and the demo report. Loss is counted on exactly the tokens training supervises
(meritrun.textenc), so a trainer's loss and this one mean the same thing. Accuracy is greedy
generation from the rendered context, compared after stripping whitespace. This module neither
loads nor merges weights beyond `evaluate_dir`'s convenience loader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meritrun.data import Example, read_examples
from meritrun.textenc import collate, encode_context, encode_example, token_losses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceScore:
    """Sums for one source; means are derived so that merging sources stays exact."""

    source: str
    examples: int  # examples with at least one supervised token (the ones scored)
    skipped: int  # examples whose response was truncated away entirely
    tokens: int  # supervised tokens
    loss_sum: float
    correct: int | None = None

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return _exp(self.mean_loss)

    @property
    def accuracy(self) -> float | None:
        if self.correct is None:
            return None
        return self.correct / self.examples if self.examples else math.nan


@dataclass(frozen=True)
class EvalResult:
    sources: dict[str, SourceScore]
    # greedy outputs per source, every example in input order (skipped ones too)
    predictions: dict[str, list[str]] | None = None

    @property
    def macro_loss(self) -> float:
        return _mean([s.mean_loss for s in self.sources.values()])

    @property
    def micro_loss(self) -> float:
        tokens = sum(s.tokens for s in self.sources.values())
        return sum(s.loss_sum for s in self.sources.values()) / tokens if tokens else math.nan

    @property
    def macro_accuracy(self) -> float | None:
        accs = [s.accuracy for s in self.sources.values()]
        return None if any(a is None for a in accs) else _mean(accs)

    @property
    def micro_accuracy(self) -> float | None:
        if any(s.correct is None for s in self.sources.values()):
            return None
        n = sum(s.examples for s in self.sources.values())
        return sum(s.correct or 0 for s in self.sources.values()) / n if n else math.nan

    def to_dict(self, *, include_predictions: bool = False) -> dict:
        out = {
            "sources": {
                name: {"examples": s.examples, "skipped": s.skipped, "tokens": s.tokens,
                       "mean_loss": s.mean_loss, "perplexity": s.perplexity,
                       "accuracy": s.accuracy}
                for name, s in self.sources.items()
            },
            "macro": {"mean_loss": self.macro_loss, "perplexity": _exp(self.macro_loss),
                      "accuracy": self.macro_accuracy},
            "micro": {"mean_loss": self.micro_loss, "perplexity": _exp(self.micro_loss),
                      "accuracy": self.micro_accuracy},
        }
        if include_predictions and self.predictions is not None:
            out["predictions"] = self.predictions
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _exp(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # a diverged model must not raise OverflowError


def json_safe(value):
    """NaN/inf (an empty source, a diverged proxy) become null: strict JSON readers refuse NaN."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def format_eval_table(result: EvalResult) -> str:
    """A fixed-width table: one row per source, then the macro and micro means."""
    rows = [("source", "examples", "tokens", "loss", "ppl", "accuracy")]

    def acc(a: float | None) -> str:
        return "-" if a is None else f"{a:.3f}"

    for name, s in result.sources.items():
        rows.append((name, str(s.examples), str(s.tokens), f"{s.mean_loss:.4f}",
                     f"{s.perplexity:.3f}", acc(s.accuracy)))
    n = sum(s.examples for s in result.sources.values())
    t = sum(s.tokens for s in result.sources.values())
    for label, loss, a in (("macro", result.macro_loss, result.macro_accuracy),
                           ("micro", result.micro_loss, result.micro_accuracy)):
        rows.append((label, str(n), str(t), f"{loss:.4f}", f"{_exp(loss):.3f}", acc(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


def _score_losses(model, tokenizer, examples, *, batch_size: int, max_seq_len: int):
    """Per example (summed loss, supervised tokens); (0.0, 0) for examples with none."""
    import torch

    encoded = [encode_example(tokenizer, ex, max_len=max_seq_len) for ex in examples]
    scored = [i for i, e in enumerate(encoded) if e.supervised]
    # Sorting by length keeps padding (wasted compute) small; results are per example anyway.
    scored.sort(key=lambda i: len(encoded[i].input_ids))
    out = [(0.0, 0)] * len(examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx in _batches(scored, batch_size):
        batch = collate([encoded[i] for i in idx], pad_id=pad)
        with torch.inference_mode():
            losses, counts = token_losses(model, batch)
        for i, loss, n in zip(idx, losses.tolist(), counts.tolist(), strict=True):
            out[i] = (float(loss), int(n))
    return out


def _generate(model, tokenizer, examples, *, batch_size: int, max_seq_len: int,
              max_new_tokens: int) -> list[str]:
    """Greedy completions, left-padded batches of similar length; cut at the first EOS."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Keep the end of an over-long context: the assistant marker must stay next to the answer.
    keep = max(1, max_seq_len - max_new_tokens)
    contexts = [encode_context(tokenizer, ex)[-keep:] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(contexts[i]))
    texts = [""] * len(examples)
    for idx in _batches(order, batch_size):
        width = max(len(contexts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(contexts[i])
            ids[row, width - n:] = torch.tensor(contexts[i])
            mask[row, width - n:] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                 use_cache=True)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            texts[i] = tokenizer.decode(new, skip_special_tokens=True)
    return texts


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_seq_len: int = 512,
    max_new_tokens: int = 32,
    generate: bool = True,
) -> EvalResult:
    """Score `model` on held-out examples, per source (sources in first-seen order)."""
    was_training = model.training
    model.eval()
    try:
        losses = _score_losses(model, tokenizer, examples, batch_size=batch_size,
                               max_seq_len=max_seq_len)
        texts = (_generate(model, tokenizer, examples, batch_size=batch_size,
                           max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
                 if generate else None)
    finally:
        model.train(was_training)
    return aggregate_scores(examples, losses, texts)


def aggregate_scores(examples: Sequence[Example], losses: Sequence[tuple[float, int]],
                     texts: Sequence[str] | None) -> EvalResult:
    """Per-example (loss sum, tokens) and outputs -> per-source sums (pure)."""
    acc: dict[str, dict] = {}
    for i, ex in enumerate(examples):
        s = acc.setdefault(ex.source, {"examples": 0, "skipped": 0, "tokens": 0, "loss_sum": 0.0,
                                       "correct": 0, "texts": []})
        if texts is not None:
            s["texts"].append(texts[i])
        loss, n = losses[i]
        if n == 0:  # nothing supervised survived truncation: excluded from every metric
            s["skipped"] += 1
            continue
        s["examples"] += 1
        s["tokens"] += n
        s["loss_sum"] += loss
        if texts is not None:
            s["correct"] += int(texts[i].strip() == ex.response.strip())
    sources = {name: SourceScore(name, s["examples"], s["skipped"], s["tokens"], s["loss_sum"],
                                 s["correct"] if texts is not None else None)
               for name, s in acc.items()}
    preds = {name: s["texts"] for name, s in acc.items()} if texts is not None else None
    return EvalResult(sources, preds)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers "Loading weights" bar while scoring many models: one bar per model load
    drowns the caller's own table or progress (search, compare, the merge report)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(model_dir: Path | str, *, dtype: str = "float32"):
    """(model, tokenizer) of a Hugging Face model directory, on CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model.eval(), tokenizer


def evaluate_dir(model_dir: Path | str, data_path: Path | str, **kwargs) -> EvalResult:
    """`evaluate_model` on a model directory and a held-out JSONL file."""
    model, tokenizer = load_model(model_dir)
    examples = read_examples([data_path])
    log.info("evaluating %s on %d examples of %s", model_dir, len(examples), data_path)
    return evaluate_model(model, tokenizer, examples, **kwargs)
