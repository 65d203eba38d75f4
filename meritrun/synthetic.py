"""A synthetic multi-source instruction mixture, generated offline and deterministically.

Two kinds of tasks. String tasks (TASKS: copy, sort, reverse a word, ...) ask for long exact
strings: a tiny model's loss moves, but exact match stays at 0.00, so the tests use them for
loss and plumbing. Label tasks (LABEL_TASKS: the next letter, "pos"/"neg", "odd"/"even", ...)
have short answers, so exact match is measurable after a few hundred steps: the demo and the
quality benchmark use them. Conflicts come two ways: `map` sources share one prompt format but
ask for different outputs (a conflict no model can resolve), and cued sources (`review*:` vs
`review:`) flip the convention behind a one-byte cue (one model can learn both, but their
gradients on the shared format pull apart: the kind MERIT splits along).
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


POSITIVE = ["great", "good", "nice", "fine", "lovely", "superb", "happy", "bright"]
NEGATIVE = ["awful", "bad", "poor", "sad", "ugly", "dull", "grim", "nasty"]
LETTERS = string.ascii_lowercase[:16]
CUE = "*"  # marks the flipped convention of a cued pair: `review*:` vs `review:`


def _on_letter(prefix: str, fn: Callable[[str], str]) -> TaskFn:
    def task(rng: random.Random) -> tuple[str, str]:
        c = rng.choice(LETTERS)
        return f"{prefix}: {c}", fn(c)

    return task


def _shift(c: str, by: int) -> str:
    return LETTERS[(LETTERS.index(c) + by) % len(LETTERS)]


def _on_digits(op: str, fn: Callable[[int, int], int]) -> TaskFn:
    def task(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "sub":
            a, b = max(a, b), min(a, b)
        return f"{op} {a} {b}", str(fn(a, b))

    return task


def _on_number(prefix: str, fn: Callable[[int], str]) -> TaskFn:
    def task(rng: random.Random) -> tuple[str, str]:
        n = rng.randint(10, 99)
        return f"{prefix} {n}", fn(n)

    return task


def _review(flip: bool) -> TaskFn:
    def task(rng: random.Random) -> tuple[str, str]:
        positive = rng.random() < 0.5
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        keyword = f"review{CUE}" if flip else "review"
        return f"{keyword}: {word}", "pos" if positive != flip else "neg"

    return task


LABEL_TASKS: dict[str, TaskFn] = {
    "next": _on_letter("next", lambda c: _shift(c, 1)),
    "prev": _on_letter("prev", lambda c: _shift(c, -1)),
    "upper": _on_letter("upper", str.upper),
    "vowel": _on_letter("vowel", lambda c: "yes" if c in "aeiou" else "no"),
    "add": _on_digits("add", lambda a, b: a + b),
    "sub": _on_digits("sub", lambda a, b: a - b),
    "max": _on_digits("max", max),
    "min": _on_digits("min", min),
    "parity": _on_number("parity", lambda n: "even" if n % 2 == 0 else "odd"),
    "size": _on_number("size", lambda n: "big" if n >= 50 else "small"),
    "tens": _on_number("tens", lambda n: str(n // 10)),
    "ones": _on_number("ones", lambda n: str(n % 10)),
    "review": _review(flip=False),
    "review-flip": _review(flip=True),  # cued conflict: same format, opposite label
    "shift-up": _on_letter("shift", lambda c: _shift(c, 1)),
    "shift-down": _on_letter(f"shift{CUE}", lambda c: _shift(c, -1)),  # cued conflict
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
    sources: Sequence[tuple[str, str]], *, train: int, held_out: int, seed: int = 0,
    tasks: Mapping[str, TaskFn] | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, held_out) examples for (source name, task) pairs; disjoint draws."""
    train_set, held_set = [], []
    for name, task in sources:
        examples = make_source(name, task, train + held_out, seed=seed, tasks=tasks)
        train_set += examples[:train]
        held_set += examples[train:]
    return train_set, held_set


# String tasks of the tests' fixtures and examples/assets (exact match stays 0 at their scale).
DEMO_SOURCES: list[tuple[str, str]] = [
    ("copy", "copy"), ("sort", "sort"), ("reverse", "reverse"), ("upper", "upper"),
]
PLANTED_CONFLICT_SOURCES: list[tuple[str, str]] = [
    ("map-rev-a", "map-reverse"), ("map-rev-b", "map-reverse"),
    ("map-up-a", "map-upper"), ("map-up-b", "map-upper"),
    ("add", "add"), ("count", "count"),
]
# `meritrun demo`'s label tasks (LABEL_TASKS): two cued conflicting sources and two others.
LABEL_SOURCES: list[tuple[str, str]] = [
    ("review", "review"), ("review-flip", "review-flip"), ("vowel", "vowel"),
    ("parity", "parity"),
]
