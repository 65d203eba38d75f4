"""Tiny causal LMs and a byte-level tokenizer, built offline (no model hub).

Used by `meritrun demo`, the tests and the benchmarks. The tokenizer is pure byte-level
(no training, so it is identical on every machine); the model is a small Qwen2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus a few specials, no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    return tokenizer


def build_tiny_model(
    *, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
    intermediate: int | None = None, max_positions: int = 512, seed: int = 0,
) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_tiny_base(out_dir: Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Write a tokenizer + freshly initialised tiny model as a Hugging Face directory."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(vocab_size=len(tokenizer), seed=seed, **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
