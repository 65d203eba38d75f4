"""Regenerate examples/assets (the tiny base model and data that examples/*.yaml use).

The assets are committed so `meritrun run examples/meritrun.yaml --local` works as is on a
fresh clone; this script shows how they were made (offline, deterministic).
Run: python examples/make_assets.py
"""

from pathlib import Path

from merit_trainer.tiny import save_tiny_base
from meritrun.data import write_examples
from meritrun.synthetic import DEMO_SOURCES, make_mixture

ASSETS = Path(__file__).resolve().parent / "assets"

if __name__ == "__main__":
    save_tiny_base(ASSETS / "base", seed=0, hidden=64, layers=2, heads=4, kv_heads=2)
    train, held = make_mixture(DEMO_SOURCES, train=64, held_out=12, seed=1)
    (ASSETS / "data").mkdir(parents=True, exist_ok=True)
    write_examples(ASSETS / "data" / "train.jsonl", train)
    write_examples(ASSETS / "data" / "held_out.jsonl", held)
    print(f"wrote {ASSETS}")
