"""A synthetic multi-source instruction mixture, generated offline and deterministically.

Sources come in families of string tasks. Some families share structure (copy and sort both
keep the characters); `conflict` sources use one prompt format ("map: ...") but ask for
different outputs (reverse vs upper-case), which is the kind of gradient conflict MERIT splits
along. Used by `meritrun demo`, the tests and the benchmarks.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence

from .data import Example, Turn

TaskFn = Callable[[random.Random], tuple[str, str]]


def _word(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(lo, hi)))


def _fmt(prefix: str, fn: Callable[[str], str]) -> TaskFn:
    def task(rng: random.Random) -> tuple[str, str]:
        w = _word(rng)
        return f"{prefix}: {w}", fn(w)

    return task


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a} {b}", str(a + b)


def _count(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"count: {w}", str(len(w))


TASKS: dict[str, TaskFn] = {
    "copy": _fmt("copy", lambda w: w),
    "sort": _fmt("sort", lambda w: "".join(sorted(w))),
    "reverse": _fmt("reverse", lambda w: w[::-1]),
    "upper": _fmt("upper", str.upper),
    "add": _add,
    "count": _count,
    # Conflicting pair: the same prompt format asks for opposite outputs.
    "map-reverse": _fmt("map", lambda w: w[::-1]),
    "map-upper": _fmt("map", str.upper),
}


def make_source(name: str, task: str, n: int, *, seed: int,
                tasks: Mapping[str, TaskFn] | None = None, salt: str = "") -> list[Example]:
    """n examples of one task (from `tasks`, default TASKS); the seed mixes in the source name
    so sources differ, and `salt` keeps another mixture's draws apart from these."""
    rng = random.Random(f"{salt}{seed}:{name}")
    examples = []
    for _ in range(n):
        prompt, response = (tasks or TASKS)[task](rng)
        # The prompt ends the line: prompt and completion are concatenated as they are (TRL's
        # convention, meritrun.textenc), so the format itself marks where the answer starts.
        examples.append(Example(name, (Turn("user", f"{prompt}\n"),
                                       Turn("assistant", response))))
    return examples


def make_mixture(
    sources: Sequence[tuple[str, str]], *, train: int, held_out: int, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, held_out) examples for (source name, task) pairs; disjoint draws."""
    train_set, held_set = [], []
    for name, task in sources:
        examples = make_source(name, task, train + held_out, seed=seed)
        train_set += examples[:train]
        held_set += examples[train:]
    return train_set, held_set


DEMO_SOURCES: list[tuple[str, str]] = [
    ("copy", "copy"), ("sort", "sort"), ("reverse", "reverse"), ("upper", "upper"),
]
PLANTED_CONFLICT_SOURCES: list[tuple[str, str]] = [
    ("map-rev-a", "map-reverse"), ("map-rev-b", "map-reverse"),
    ("map-up-a", "map-upper"), ("map-up-b", "map-upper"),
    ("add", "add"), ("count", "count"),
]
