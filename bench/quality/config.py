"""The benchmark's sizes, full and quick, in one place (the docs page quotes them).

Sized from measured step times on the 2 shared cores (see docs/quality.md): AdamW on 16 short
examples (about 30 tokens) takes about 0.09 s per step for a 4.1M-parameter Qwen2, 0.17 s for
the 9M one used here and 0.24 s for 13.5M when the machine is idle, and 1.5-3x that when other
sessions are busy; that is what bounds the full run to well under an hour.

The fine-tuning budget (192 examples per source, lr 5e-4, one epoch per arm) is the smallest
that makes fine-tuning matter: at the first run's 96 examples and lr 3e-4 every arm stayed
within 2 points of the base. Measured with the joint arm (one seed, this base): 192 / 5e-4
lifts the mean held-out accuracy from 70.5% to 80.5% and the cued new-convention sources from
near 0% to 78-97%; 256 / 1e-3 did as well on those but lost 10 points on `digit` (forgetting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sizes:
    hidden: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    train_per_source: int = 192
    held_out_per_source: int = 32
    base_per_task: int = 1800  # stage-2 base: examples per conventional task, one epoch
    base_lr: float = 1.5e-3
    batch_size: int = 16
    lr: float = 5e-4  # fine-tuning peak learning rate (every arm, expert and mixture)
    seeds: tuple[int, ...] = (0, 1, 2)
    expert_epochs: float = 1.0  # capability experts (OTA table, search experts)
    densities: tuple[float, ...] = (0.1, 0.3, 0.6)  # FFG keep fractions
    calibration_samples: int = 64
    projection_dim: int = 4096
    search_families: tuple[str, ...] = ("letter", "digit", "number")
    search_denominator: int = 6  # simplex_grid(3, 6): 10 candidates, every weight >= 1/6
    max_new_tokens: int = 6

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Sizes()
QUICK = Sizes(
    hidden=128, layers=2, train_per_source=32, lr=1e-3, held_out_per_source=8, base_per_task=300,
    base_lr=2e-3, seeds=(0,), densities=(0.1, 0.3), calibration_samples=16,
    projection_dim=1024,
)  # one seed: the smoke run checks the pipeline and the budgets; spreads need the full run
