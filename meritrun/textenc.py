"""Turning examples into token ids and supervised labels, and the supervised loss.

Supervised tokens are the final assistant turn (plus EOS); everything before it is context
with label -100. Shared by training, profiling and evaluation (trainer and merger images) so
all three count and score the same tokens. torch is imported inside the functions that need
it: the core package never imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import Example

if TYPE_CHECKING:
    import torch

IGNORE = -100
_USER, _ASSISTANT, _SYSTEM = "<|user|>\n", "<|assistant|>\n", "<|system|>\n"
_ROLE_PREFIX = {"user": _USER, "assistant": _ASSISTANT, "system": _SYSTEM}


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def render_context(tokenizer, example: Example) -> str:
    """The text the model sees before the supervised response."""
    context = example.turns[:-1]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": t.role, "content": t.content} for t in context]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{_ROLE_PREFIX[t.role]}{t.content}\n" for t in context) + _ASSISTANT


def encode_example(tokenizer, example: Example, *, max_len: int) -> Encoded:
    """Token ids and labels; context and response are tokenized apart so the boundary is exact.

    Truncation keeps the start; an example whose response is cut away entirely has no
    supervised tokens (callers skip it and count it).
    """
    context = tokenizer(render_context(tokenizer, example), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    ids = (context + response)[:max_len]
    labels = ([IGNORE] * len(context) + response)[:max_len]
    return Encoded(ids, labels)


def collate(batch: Sequence[Encoded], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (padding ignored)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed supervised loss and supervised token count, shape (batch,) each.

    Summing (not averaging) lets callers weight micro-batches by tokens exactly.
    """
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE, reduction="none",
    ).view(targets.shape)
    valid = targets != IGNORE
    return (losses * valid).sum(dim=1), valid.sum(dim=1)
