"""The calibration set (MERIT step 2) and the token counts the split balances.

Per source, walk the examples with a stride (default 5: neighbouring lines of a file are
often near-duplicates) and draw up to n of them with a fixed seed. A source with fewer strided
examples than n uses all of them and is reported as short, because its gradient estimate is
noisier. Token counts use meritrun.textenc, exactly as training counts them, so the plan's
masses are the masses the merge will weight by. No gradients here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meritrun.data import Example
from meritrun.textenc import Encoded, encode_example

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 512


@dataclass(frozen=True)
class CalibrationSet:
    examples: dict[str, list[Example]]
    strided: dict[str, int]  # examples left after the stride, per source
    short: list[str]  # sources with fewer strided examples than asked for

    def counts(self) -> dict[str, int]:
        return {name: len(exs) for name, exs in self.examples.items()}


def calibration_indices(n: int, *, stride: int, samples: int, seed: int, source: str) -> list[int]:
    """Indices (ascending) of the calibration examples of a source with n examples."""
    strided = list(range(0, n, stride))
    if len(strided) <= samples:
        return strided
    # The source name is mixed in so two sources of equal size do not pick the same rows.
    rng = random.Random(f"meritrun-calibration:{seed}:{source}")
    return sorted(rng.sample(strided, samples))


def build_calibration(
    examples_by_source: Mapping[str, Sequence[Example]], *, stride: int, samples: int, seed: int
) -> CalibrationSet:
    chosen, strided, short = {}, {}, []
    for name, examples in examples_by_source.items():
        idx = calibration_indices(len(examples), stride=stride, samples=samples, seed=seed,
                                  source=name)
        chosen[name] = [examples[i] for i in idx]
        strided[name] = len(range(0, len(examples), stride))
        if strided[name] < samples:
            short.append(name)
    if short:
        log.info("calibration: %d source(s) have fewer than %d strided examples and use all: %s",
                 len(short), samples, ", ".join(short))
    return CalibrationSet(chosen, strided, short)


def encode_supervised(tokenizer, examples: Sequence[Example], *, max_len: int) -> list[Encoded]:
    """Encoded examples that keep at least one supervised token after truncation."""
    encoded = [encode_example(tokenizer, ex, max_len=max_len) for ex in examples]
    kept = [e for e in encoded if e.supervised > 0]
    if len(kept) < len(encoded):
        log.warning("%d example(s) lost every supervised token to truncation at %d tokens",
                    len(encoded) - len(kept), max_len)
    return kept


def count_supervised_tokens(tokenizer, examples: Sequence[Example], *, max_len: int) -> int:
    """Supervised tokens of one epoch over the examples (the training stage's definition)."""
    return sum(encode_example(tokenizer, ex, max_len=max_len).supervised for ex in examples)
