"""Did it help? Several models scored side by side on one held-out file, per source.

The merge report's `evaluation` section (base, each partition, merged), `meritrun compare`
(any models) and the demo's closing table (plus the joint baseline) are all this one table.
The numbers come from `evaluation` (loss on exactly the supervised tokens, greedy exact
match); the layout is `meritrun.report.format_report_table`, which the core CLI also uses to
print the table from a merge report without importing torch. This module neither merges nor
fetches: callers hand it local model directories.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meritrun.data import Example, read_examples
from meritrun.errors import DataError

from .evaluation import evaluate_model, json_safe, load_model, quiet_loading

log = logging.getLogger(__name__)

EVALUATION_FORMAT = "meritrun.scoreboard/v1"


@dataclass(frozen=True)
class ModelRef:
    """A model to score: a full HF model dir, or a peft adapter dir with the base it adapts."""

    path: Path
    base: Path | None = None


def answer_budget(tokenizer, examples: list[Example]) -> int:
    """Tokens to generate: the longest reference answer plus its EOS. A longer greedy output
    cannot match exactly, so generating further only costs time (an untrained base never
    stops on its own)."""
    longest = max((len(tokenizer(ex.response, add_special_tokens=False)["input_ids"])
                   for ex in examples), default=1)
    return longest + 1


def load_ref(ref: ModelRef):
    """(model, tokenizer) of a full model dir, or of base + adapter merged (LoRA)."""
    if not (ref.path / "adapter_config.json").is_file():
        return load_model(ref.path)
    if ref.base is None:
        raise DataError(f"{ref.path}: a LoRA adapter needs its base model to be scored")
    from peft import PeftModel

    model, tokenizer = load_model(ref.base)
    with quiet_loading():
        merged = PeftModel.from_pretrained(model, str(ref.path)).merge_and_unload()
    return merged.eval(), tokenizer


def score_models(models: Mapping[str, ModelRef | Path], held_out: Path, *,
                 max_seq_len: int = 512, batch_size: int = 16,
                 max_new_tokens: int | None = None, generate: bool = True) -> dict[str, Any]:
    """{"format", "heldOut", "maxNewTokens", "sources", "models": {name: EvalResult dict}}.

    Models are loaded one at a time (a 7B model and its neighbours never share memory).
    `generate=False` scores loss only (accuracy None).
    """
    examples = read_examples([held_out])
    if not examples:
        raise DataError(f"{held_out}: no held-out examples to score on")
    scored: dict[str, Any] = {}
    budget = max_new_tokens
    for name, ref in models.items():
        ref = ref if isinstance(ref, ModelRef) else ModelRef(Path(ref))
        try:
            model, tokenizer = load_ref(ref)
        except (OSError, ValueError) as e:
            raise DataError(f"model {name} ({ref.path}): not loadable: {e}") from e
        budget = budget or answer_budget(tokenizer, examples)
        result = evaluate_model(model, tokenizer, examples, batch_size=batch_size,
                                max_seq_len=max_seq_len, max_new_tokens=budget,
                                generate=generate)
        scored[name] = result.to_dict()
        log.info("scored %s: mean loss %.4f", name, result.macro_loss)
        del model
    sources = list(dict.fromkeys(ex.source for ex in examples))
    return json_safe({"format": EVALUATION_FORMAT, "heldOut": str(held_out),
                      "maxNewTokens": budget, "sources": sources, "models": scored})
