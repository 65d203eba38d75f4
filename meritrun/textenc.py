"""Turning examples into token ids and supervised labels, and the supervised loss.

One rule for training, profiling and evaluation (trainer and merger images), so all three
count and score the same tokens. It follows TRL's SFTTrainer:
- a standard prompt-completion example is the prompt and the completion concatenated as they
  are (no role markers of ours: a base model is trained on the dataset's own format), with the
  tokenizer's usual special tokens (a BOS where it adds one) and an EOS after the completion;
- a conversational example (`messages`) is rendered with the tokenizer's chat template; the
  supervised part is what the template writes for the final assistant turn. A tokenizer
  without a chat template gets DEFAULT_CHAT_TEMPLATE (ChatML), with a warning once.
Supervised tokens are the completion only (label -100 elsewhere). torch is imported inside the
functions that need it: the core package never imports torch at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import Example

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
IGNORE = -100
# ChatML, as Qwen and many others use it; documented in docs/data.md.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_warned: set[str] = set()


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or the default one (said once per tokenizer)."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _warned:
        _warned.add(name)
        log.warning("tokenizer %s has no chat template: conversational examples use the "
                    "default ChatML template (<|im_start|>role ... <|im_end|>; docs/data.md)",
                    name)
    return DEFAULT_CHAT_TEMPLATE


def render_texts(tokenizer, example: Example) -> tuple[str, str]:
    """(context, completion) as text: what the model reads first, and what it learns."""
    if not example.conversational:
        return example.prompt, example.response
    template = chat_template(tokenizer)
    messages = [{"role": t.role, "content": t.content} for t in example.turns]
    context = tokenizer.apply_chat_template(messages[:-1], chat_template=template,
                                            tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    # The template's own end-of-turn belongs to the completion; a template that rewrites
    # earlier turns once the answer is there (rare) falls back to the bare answer.
    return context, whole[len(context):] if whole.startswith(context) else example.response


def render_context(tokenizer, example: Example) -> str:
    """The text the model sees before the supervised completion."""
    return render_texts(tokenizer, example)[0]


def _special(example: Example) -> bool:
    # Plain text gets the tokenizer's special tokens as TRL's tokenizer call does; a chat
    # template writes its own (a second BOS would be a token the model never saw).
    return not example.conversational


def encode_context(tokenizer, example: Example) -> list[int]:
    """Token ids of the context alone (for generation), tokenized as encode_example does."""
    context = render_context(tokenizer, example)
    return tokenizer(context, add_special_tokens=_special(example))["input_ids"]


def encode_example(tokenizer, example: Example, *, max_len: int) -> Encoded:
    """Token ids and labels of one example.

    As TRL: the context and context + completion are tokenized, and the completion is what
    the second adds to the first; where a merge across the boundary breaks that prefix, the
    completion is tokenized on its own so the boundary stays exact. An EOS ends the completion
    unless the chat template already put one there. Truncation keeps the start; an example
    whose completion is cut away entirely has no supervised tokens (callers skip and count it).
    """
    context_text, completion_text = render_texts(tokenizer, example)
    special = _special(example)
    context = tokenizer(context_text, add_special_tokens=special)["input_ids"]
    joint = tokenizer(context_text + completion_text, add_special_tokens=special)["input_ids"]
    if joint[:len(context)] == context and len(joint) > len(context):
        completion = joint[len(context):]
    else:
        completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in completion:
        completion = completion + [eos]
    ids = (context + completion)[:max_len]
    labels = ([IGNORE] * len(context) + completion)[:max_len]
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
