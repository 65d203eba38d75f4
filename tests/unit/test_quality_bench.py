"""The quality benchmark's pure parts: its mixture, its budget arithmetic, its tables."""

from __future__ import annotations

import math

import pytest

from bench.quality.budget import arm_epochs, budget_gap, mixture_counts
from bench.quality.merit import ARMS
from bench.quality.mixture import (
    CONFLICT_FAMILIES,
    CUE,
    SOURCES,
    base_mixture,
    benchmark_mixture,
    conflicting_pairs,
    families,
    format_key,
    new_convention_sources,
)
from bench.quality.search import draw_mixture
from bench.quality.tables import fmt_ms, markdown_table, mean_spread, merit_rows


def test_mixture_is_deterministic_and_seed_dependent():
    a_train, a_held = benchmark_mixture(train=10, held_out=4, seed=3)
    b_train, b_held = benchmark_mixture(train=10, held_out=4, seed=3)
    c_train, _ = benchmark_mixture(train=10, held_out=4, seed=4)
    assert a_train == b_train and a_held == b_held
    assert a_train != c_train
    assert len(a_train) == 10 * len(SOURCES) and len(a_held) == 4 * len(SOURCES)


def test_mixture_has_sixteen_sources_in_families_with_resolvable_conflicts():
    fams = families()
    assert len(SOURCES) >= 16 and len(fams) >= 4
    assert all(len(names) >= 2 for names in fams.values())
    train, _ = benchmark_mixture(train=200, held_out=0, seed=0)
    answers: dict[str, set[str]] = {}
    by_format: dict[tuple[str, str], dict[str, set[str]]] = {}
    for ex in train:
        answers.setdefault(ex.prompt, set()).add(ex.response)
        stripped = ex.prompt.replace(CUE, "")
        by_format.setdefault((stripped, ex.source), {}).setdefault(ex.prompt, set()).add(
            ex.response)
    # learnable: no prompt anywhere in the mixture has two answers, so one model can get 100%
    assert all(len(a) == 1 for a in answers.values())
    pairs = conflicting_pairs()
    assert len(pairs) == 8
    assert {a.split("-")[0] for a, _ in pairs} == set(CONFLICT_FAMILIES)
    for a, b in pairs:
        # same format up to the one-byte cue: exactly one side carries it ...
        a_prompts = {ex.prompt for ex in train if ex.source == a}
        b_prompts = {ex.prompt for ex in train if ex.source == b}
        assert (CUE in next(iter(a_prompts))) != (CUE in next(iter(b_prompts)))
        assert {format_key(p) for p in a_prompts} == {format_key(p) for p in b_prompts}
        # ... and the cue flips the answer: the same stripped prompt, another answer
        a_answer = {p.replace(CUE, ""): r for (p, r) in
                    ((ex.prompt, ex.response) for ex in train if ex.source == a)}
        b_answer = {p.replace(CUE, ""): r for (p, r) in
                    ((ex.prompt, ex.response) for ex in train if ex.source == b)}
        shared = set(a_answer) & set(b_answer)
        assert shared and all(a_answer[p] != b_answer[p] for p in shared), (a, b)
    assert set(new_convention_sources()) == {b for _, b in pairs}


def test_answers_are_short_and_base_mixture_lacks_the_cued_conventions():
    train, held = benchmark_mixture(train=50, held_out=10, seed=0)
    assert max(len(ex.response) for ex in train + held) <= 5
    base = base_mixture(per_task=5, seed=0)
    tasks = {ex.source.removeprefix("base-") for ex in base}
    assert "review-flip" not in tasks and "shift-down" not in tasks
    assert "review" in tasks and "shift-up" in tasks
    assert not any(CUE in ex.prompt for ex in base)
    assert any(CUE in ex.prompt for ex in train)
    assert base == base_mixture(per_task=5, seed=0)


def test_every_arm_trains_one_epoch_except_the_two_epoch_control():
    assert {a: arm_epochs(a) for a in ARMS} == {
        "joint-1ep": 1.0, "joint-2ep": 2.0, "random-8": 1.0, "merit-2": 1.0, "merit-4": 1.0,
        "merit-8": 1.0}
    assert budget_gap([600, 400], 1000) == 0.0
    assert budget_gap([1100], 1000) == pytest.approx(0.1)


def test_mixture_counts_split_the_token_budget_by_weight():
    counts = mixture_counts([0.5, 0.25, 0.25], [2.0, 4.0, 1.0], 1000)
    assert counts == [250, 62, 250]
    tokens = [c * t for c, t in zip(counts, [2.0, 4.0, 1.0], strict=True)]
    assert sum(tokens) == pytest.approx(1000, rel=0.01)
    assert tokens[0] == pytest.approx(2 * tokens[1], rel=0.05)
    assert mixture_counts([1e-6, 1.0], [3.0, 3.0], 30) == [1, 10]  # never an empty domain
    with pytest.raises(ValueError):
        mixture_counts([0.0, 0.0], [1.0, 1.0], 10)


def test_draw_mixture_cycles_small_pools_deterministically():
    train, _ = benchmark_mixture(train=3, held_out=0, seed=0)
    pools = [train[:3], train[3:6]]
    drawn = draw_mixture(pools, [5, 1], seed=1)
    assert len(drawn) == 6 and drawn == draw_mixture(pools, [5, 1], seed=1)
    assert set(drawn[:5]) == set(pools[0]) and drawn[5] in pools[1]


def test_mean_spread_and_formatting():
    mean, spread = mean_spread([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and spread == pytest.approx(0.1)
    assert mean_spread([0.3]) == (0.3, None)
    assert fmt_ms([0.5, 0.6, 0.7], scale=100) == "60.0 ± 10.0"
    assert fmt_ms([1.23456], digits=3) == "1.235"
    with pytest.raises(ValueError):
        mean_spread([])
    table = markdown_table(["arm", "acc"], [["a", "1.0 ± 0.1"], ["b", "2.0"]])
    assert table.splitlines() == ["| arm | acc |", "|---|---:|", "| a | 1.0 ± 0.1 |",
                                  "| b | 2.0 |"]


def test_merit_rows_average_over_seeds_and_split_conflict_sources():
    def run(arm, seed, acc_a, acc_c):
        return {"arm": arm, "seed": seed, "partitions": [["a"], ["c"]], "tokens": [60, 40],
                "scores": {"a": {"accuracy": acc_a, "loss": 1.0},
                           "c": {"accuracy": acc_c, "loss": 2.0}}}

    results = [run("merit-2", 0, 0.8, 0.2), run("merit-2", 1, 0.6, 0.4)]
    (row,) = merit_rows(results, arms=["joint-1ep", "merit-2"], sources=["a", "c"],
                        conflict=["c"], budget=100)
    assert row[:4] == ["merit-2", "2", "1.00x", 2]
    assert row[4] == "50.0 ± 0.0"  # mean of (0.8+0.2)/2 and (0.6+0.4)/2
    assert row[5] == "70.0 ± 14.1" and row[6] == "30.0 ± 14.1"
    assert row[7] == "1.5000 ± 0.0000"
    assert not math.isnan(float(row[4].split()[0]))
