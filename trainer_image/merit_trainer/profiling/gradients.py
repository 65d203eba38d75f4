"""Per-source mean gradients at the base weights, sketched as they are produced (MERIT step 3).

The conflict signal of a source is the gradient of its mean supervised loss (mean over all
supervised tokens of its calibration examples) at theta0, restricted to a parameter filter.
Micro-batches keep activation memory bounded; each one's summed loss is divided by the
source's total token count, so the micro-batch gradients add up to exactly that mean-loss
gradient. A post-accumulate-grad hook on every selected parameter sketches its gradient the
moment backward has produced it and frees it, so at most one parameter's gradient is alive at
a time; parameters outside the filter do not require grad at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from meritrun.errors import SpecError, StageFailed
from meritrun.textenc import Encoded, collate, token_losses

from .sketch import CountSketch

log = logging.getLogger(__name__)

# Attention projections across the common families: Llama/Qwen/Mistral (self_attn.q_proj ...),
# GPT-2 (attn.c_attn, attn.c_proj; not mlp.c_proj), Falcon/BLOOM (query_key_value, dense),
# Phi-3 (qkv_proj), BERT-style (attention.self.query, attention.output.dense).
ATTENTION_PATTERN = (
    r"(^|\.)(self_attn|attn|attention|self_attention)\.(self\.|output\.)?"
    r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj|query_key_value|dense|out_proj"
    r"|query|key|value|Wqkv)\."
)


def parameter_pattern(spec: str) -> re.Pattern[str] | None:
    """The regex a filter stands for; None means every parameter."""
    if spec == "all":
        return None
    try:
        return re.compile(ATTENTION_PATTERN if spec == "attention" else spec)
    except re.error as e:
        raise SpecError(f"invalid parameter regex {spec!r}: {e}",
                        path="spec.profiling.parameters") from e


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs the filter keeps: 'attention', 'all' or a regex (re.search)."""
    pattern = parameter_pattern(spec)
    chosen = [(n, p) for n, p in model.named_parameters()
              if pattern is None or pattern.search(n)]
    if not chosen:
        raise SpecError(f"parameter filter {spec!r} matches no parameter of the model",
                        path="spec.profiling.parameters")
    return chosen


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise StageFailed(f"cannot load the tokenizer of {model_dir}: {e}") from e


def load_base(model_dir: Path, *, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of a Hugging Face directory, offline."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise StageFailed(f"cannot load the base model {model_dir}: {e}") from e
    model.eval()  # no dropout: the gradient at theta0 must be deterministic
    return model, tokenizer


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing for a model profiled in eval mode: Hugging Face layers only
    checkpoint while `training`, so only that flag of each layer is raised; every other
    module stays in eval mode (no dropout: the gradient at theta0 stays deterministic)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


class GradientSketcher:
    """Hooks that sketch each selected parameter's gradient into the current source's row."""

    def __init__(self, model: torch.nn.Module, parameters: str, sketch: CountSketch) -> None:
        self.model, self.sketch = model, sketch
        self.selected = select_parameters(model, parameters)
        chosen = {id(p) for _, p in self.selected}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.device = next(model.parameters()).device
        self._row: torch.Tensor | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name))
                         for name, p in self.selected]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for _, p in self.selected)

    @property
    def largest_parameter(self) -> int:
        return max(p.numel() for _, p in self.selected)

    def _hook(self, name: str):
        def sketch_and_free(param: torch.Tensor) -> None:
            if self._row is not None and param.grad is not None:
                self.sketch.add(self._row, name, param.grad)
            param.grad = None

        return sketch_and_free

    def sketch_source(
        self, encoded: Sequence[Encoded], *, micro_batch_size: int, pad_id: int
    ) -> tuple[np.ndarray, int]:
        """(sketch of the mean-loss gradient over all supervised tokens, that token count)."""
        tokens = sum(e.supervised for e in encoded)
        if tokens == 0:
            raise ValueError("no supervised tokens to take a gradient of")
        self._row = torch.zeros(self.sketch.dim, dtype=torch.float64, device=self.device)
        try:
            for start in range(0, len(encoded), micro_batch_size):
                batch = collate(encoded[start:start + micro_batch_size], pad_id=pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                summed, _ = token_losses(self.model, batch)
                (summed.sum() / tokens).backward()
            return self._row.cpu().numpy(), tokens
        finally:
            self._row = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
