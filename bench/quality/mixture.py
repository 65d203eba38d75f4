"""The quality benchmark's instruction mixture: 20 sources in 5 families, with real conflicts.

The string tasks of `meritrun.synthetic` (copy, reverse a word, ...) ask a tiny model for long
exact strings and score 0.00 accuracy at this scale, so every answer here is short (a letter,
a digit, a word such as "odd" or "pos"): exact match is then measurable after a few hundred
steps. Families:

- `letter`, `digit`, `number`: shared structure, no conflict (each source has its own prompt
  keyword; `shift-up` in `shift` computes the same function as `letter-next`).
- `sent` and `shift`: conflict. Two sources of each family use the conventional prompt and
  the other two the same format marked by a one-byte cue with the opposite convention
  (`review: great` -> "pos" but `review*: great` -> "neg"; `shift: c` -> "d" but
  `shift*: c` -> "b"). One model CAN learn both (the cue tells them apart), but their
  gradients on the shared format pull the shared weights in opposite directions: resolvable,
  interfering conflict, which is what MERIT splits along. (An earlier design used identical
  prompts with opposite answers; no single model can exceed 50% on those, see docs.)

The "stage 2" base is trained on `base_mixture`: the conventional (non-flipped) tasks of every
family, drawn with another seed, so the flipped sources are new conventions the fine-tuning
mixture introduces. Everything is seeded; the same arguments give the same examples on every
machine. The tasks are `meritrun.synthetic.LABEL_TASKS` (the demo's too); the draws are
salted apart from the demo's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meritrun.data import Example
from meritrun.synthetic import CUE, make_source
from meritrun.synthetic import LABEL_TASKS as TASKS


def format_key(prompt: str) -> str:
    """The prompt's format (its keyword) with the convention cue removed."""
    return prompt.split()[0].replace(CUE, "")


@dataclass(frozen=True)
class Source:
    name: str
    family: str
    task: str


SOURCES: tuple[Source, ...] = (
    Source("letter-next", "letter", "next"), Source("letter-prev", "letter", "prev"),
    Source("letter-upper", "letter", "upper"), Source("letter-vowel", "letter", "vowel"),
    Source("digit-add", "digit", "add"), Source("digit-sub", "digit", "sub"),
    Source("digit-max", "digit", "max"), Source("digit-min", "digit", "min"),
    Source("number-parity", "number", "parity"), Source("number-size", "number", "size"),
    Source("number-tens", "number", "tens"), Source("number-ones", "number", "ones"),
    Source("sent-a", "sent", "review"), Source("sent-b", "sent", "review"),
    Source("sent-flip-a", "sent", "review-flip"), Source("sent-flip-b", "sent", "review-flip"),
    Source("shift-up-a", "shift", "shift-up"), Source("shift-up-b", "shift", "shift-up"),
    Source("shift-down-a", "shift", "shift-down"), Source("shift-down-b", "shift", "shift-down"),
)
CONFLICT_FAMILIES = ("sent", "shift")
# The conventions the base has learned; the other tasks of a conflict family contradict them.
BASE_TASKS = tuple(t for t in TASKS if t not in ("review-flip", "shift-down"))


def families(sources: tuple[Source, ...] = SOURCES) -> dict[str, list[str]]:
    """family -> its source names, families in first-seen order."""
    out: dict[str, list[str]] = {}
    for s in sources:
        out.setdefault(s.family, []).append(s.name)
    return out


def family_of(sources: tuple[Source, ...] = SOURCES) -> dict[str, str]:
    return {s.name: s.family for s in sources}


def make_examples(source: str, task: str, n: int, *, seed: int) -> list[Example]:
    """n examples of one of the benchmark's tasks (its own draws, salted apart from the demo's)."""
    return make_source(source, task, n, seed=seed, tasks=TASKS, salt="quality:")


def benchmark_mixture(
    *, train: int, held_out: int, seed: int = 0, sources: tuple[Source, ...] = SOURCES
) -> tuple[list[Example], list[Example]]:
    """(train, held_out): disjoint draws per source, sources in SOURCES order."""
    train_set: list[Example] = []
    held_set: list[Example] = []
    for s in sources:
        examples = make_examples(s.name, s.task, train + held_out, seed=seed)
        train_set += examples[:train]
        held_set += examples[train:]
    return train_set, held_set


def base_mixture(*, per_task: int, seed: int = 0) -> list[Example]:
    """The stage-2 base's broad mixture: every conventional task, another seed, interleaved."""
    per = [make_examples(f"base-{t}", t, per_task, seed=seed + 7919) for t in BASE_TASKS]
    return [ex for row in zip(*per, strict=True) for ex in row]


def conflicting_pairs(sources: tuple[Source, ...] = SOURCES) -> list[tuple[str, str]]:
    """Pairs of sources whose prompts share a format (up to the cue) but whose answers differ."""
    prompt_key = {t: format_key(TASKS[t](random.Random(0))[0]) for t in TASKS}
    pairs = []
    for i, a in enumerate(sources):
        for b in sources[i + 1:]:
            if a.task != b.task and prompt_key[a.task] == prompt_key[b.task]:
                pairs.append((a.name, b.name))
    return pairs


def new_convention_sources(sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """Sources whose task the stage-2 base never saw (the cued conventions)."""
    return [s.name for s in sources if s.task not in BASE_TASKS]
