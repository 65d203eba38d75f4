"""Tiny models and data for tests: built once per session, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meritrun.data import write_examples
from meritrun.synthetic import DEMO_SOURCES, make_mixture


@dataclass(frozen=True)
class TinyMixture:
    train: Path
    held_out: Path
    sources: list[str]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (about 0.1M parameters) with a byte-level tokenizer, as an HF directory."""
    from merit_trainer.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_mixture(tmp_path_factory: pytest.TempPathFactory) -> TinyMixture:
    """Four synthetic sources, 40 train + 10 held-out examples each."""
    root = tmp_path_factory.mktemp("mixture")
    train, held = make_mixture(DEMO_SOURCES, train=40, held_out=10, seed=0)
    write_examples(root / "train.jsonl", train)
    write_examples(root / "held_out.jsonl", held)
    return TinyMixture(root / "train.jsonl", root / "held_out.jsonl", [s for s, _ in DEMO_SOURCES])
