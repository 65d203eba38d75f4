"""Split strategies: token balance (against brute force), determinism, constraints, errors."""

from __future__ import annotations

import random

import pytest

from meritrun.errors import SpecError
from meritrun.partitioning import (
    allocate_counts,
    balanced_split,
    best_cut,
    by_site_split,
    conflict_split,
    make_plan,
    manual_split,
    random_split,
)


def _random_case(rng: random.Random, n: int, axes: int):
    names = [f"s{i}" for i in range(n)]
    scores = {s: [rng.uniform(-1, 1) for _ in range(axes)] for s in names}
    tokens = {s: rng.randint(1, 1000) for s in names}
    return names, scores, tokens


def _brute_force_gap(masses: list[int]) -> int:
    total = sum(masses)
    return min(abs(2 * sum(masses[:c]) - total) for c in range(1, len(masses)))


@pytest.mark.parametrize("case", range(40))
def test_first_cut_is_as_balanced_as_atomic_sources_allow(case):
    rng = random.Random(case)
    names, scores, tokens = _random_case(rng, rng.randint(2, 9), 1)
    left, right = conflict_split(scores, tokens, 1, seed=0)
    ordered = sorted(names, key=lambda s: scores[s][0])
    assert left + right == ordered  # a cut of the axis-1 order, left side = low scores
    gap = abs(sum(tokens[s] for s in left) - sum(tokens[s] for s in right))
    assert gap == _brute_force_gap([tokens[s] for s in ordered])


@pytest.mark.parametrize("case", range(20))
def test_second_level_cuts_each_half_along_axis_two(case):
    rng = random.Random(100 + case)
    names, scores, tokens = _random_case(rng, rng.randint(4, 10), 2)
    parts = conflict_split(scores, tokens, 2, seed=0)
    halves = conflict_split(scores, tokens, 1, seed=0)
    assert sorted(s for p in parts for s in p) == sorted(names)  # each source exactly once
    assert len(parts) in (3, 4)
    # each half of level 1 is cut by axis 2 at its own brute-force optimum
    it = iter(parts)
    for half in halves:
        if len(half) == 1:
            assert next(it) == half
            continue
        a, b = next(it), next(it)
        assert set(a) | set(b) == set(half)
        ordered = sorted(half, key=lambda s: scores[s][1])
        assert a + b == ordered
        gap = abs(sum(tokens[s] for s in a) - sum(tokens[s] for s in b))
        assert gap == _brute_force_gap([tokens[s] for s in ordered])


def test_best_cut_prefers_smallest_index_on_ties_and_general_shares():
    assert best_cut([1, 2, 1]) == 1  # 1|3 and 3|1 are equally good
    assert best_cut([5, 5]) == 1
    assert best_cut([1, 1, 1, 1, 1, 1], left_share=1, total_share=3) == 2
    with pytest.raises(ValueError):
        best_cut([3])


def test_single_source_groups_yield_fewer_partitions(caplog):
    scores = {"a": [0.0, 0.0], "b": [1.0, 0.0]}
    parts = conflict_split(scores, {"a": 10, "b": 10}, 2, seed=0)
    assert parts == [["a"], ["b"]]
    assert "got 2" in caplog.text


def test_conflict_split_is_deterministic_and_breaks_ties_by_seed():
    scores = {f"s{i}": [0.0] for i in range(8)}  # every score tied
    tokens = {s: 1 for s in scores}
    first = conflict_split(scores, tokens, 1, seed=3)
    assert first == conflict_split(scores, tokens, 1, seed=3)
    seen = {tuple(map(tuple, conflict_split(scores, tokens, 1, seed=s))) for s in range(6)}
    assert len(seen) > 1


def test_conflict_split_rejects_bad_input():
    with pytest.raises(SpecError, match="need 2"):
        conflict_split({"a": [1.0]}, {"a": 1}, 2, seed=0)
    with pytest.raises(SpecError, match="no token count"):
        conflict_split({"a": [1.0], "b": [2.0]}, {"a": 1}, 1, seed=0)
    assert conflict_split({"a": [], "b": []}, {"a": 1, "b": 2}, 0, seed=0) == [["a", "b"]]


def test_random_split_is_seeded_balanced_and_complete():
    rng = random.Random(7)
    sources = [f"s{i}" for i in range(12)]
    tokens = {s: rng.randint(50, 150) for s in sources}
    a = random_split(sources, tokens, 4, seed=1)
    assert a == random_split(sources, tokens, 4, seed=1)
    assert a != random_split(sources, tokens, 4, seed=2)
    assert sorted(s for p in a for s in p) == sorted(sources) and len(a) == 4
    masses = [sum(tokens[s] for s in p) for p in a]
    assert max(masses) - min(masses) <= 150  # greedy fill: within one source of each other
    assert len(random_split(sources[:3], tokens, 8, seed=0)) == 3


def test_balanced_split_largest_first():
    assert balanced_split(["a", "b", "c", "d"], {"a": 5, "b": 4, "c": 3, "d": 2}, 2) == [
        ["a", "d"], ["b", "c"]]


def test_manual_split_validation_names_the_source():
    sources = ["a", "b", "c"]
    assert manual_split([["a"], ["c", "b"]], sources) == [["a"], ["c", "b"]]
    with pytest.raises(SpecError, match="'x'"):
        manual_split([["a", "x"], ["b", "c"]], sources)
    with pytest.raises(SpecError, match="'b' is in partitions 0 and 1"):
        manual_split([["a", "b"], ["b", "c"]], sources)
    with pytest.raises(SpecError, match="'c' is in no partition"):
        manual_split([["a"], ["b"]], sources)
    with pytest.raises(SpecError, match="partition 1 is empty"):
        manual_split([["a", "b", "c"], []], sources)


def _site_case(seed: int):
    rng = random.Random(seed)
    sources = [f"s{i}" for i in range(10)]
    site_of = {s: rng.choice(["east", "west", None]) for s in sources}
    tokens = {s: rng.randint(10, 100) for s in sources}
    scores = {s: [rng.uniform(-1, 1), rng.uniform(-1, 1)] for s in sources}
    return sources, site_of, tokens, scores


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("with_scores", [False, True])
def test_by_site_never_mixes_sites(seed, with_scores):
    sources, site_of, tokens, scores = _site_case(seed)
    parts = by_site_split(sources, tokens, site_of, 4, scores=scores if with_scores else None,
                          seed=0)
    assert sorted(s for p in parts for s in p) == sorted(sources)
    for p in parts:
        assert len({site_of[s] for s in p}) == 1
    sites = {site_of[s] for s in sources}
    assert len(parts) >= len(sites)
    plan = make_plan(parts, strategy="bySite", tokens=tokens, site_of=site_of)
    for planned in plan.partitions:
        assert all(site_of[s] == planned.site for s in planned.sources)


def test_by_site_gives_each_site_a_partition_even_when_k_is_small():
    site_of = {"a": "x", "b": "y", "c": "z"}
    parts = by_site_split(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, site_of, 1)
    assert sorted(parts) == [["a"], ["b"], ["c"]]


def test_allocate_counts_is_proportional_with_a_floor_of_one():
    assert allocate_counts([900, 100], [10, 10], 4) == [3, 1]
    assert allocate_counts([100, 100, 100], [5, 5, 5], 2) == [1, 1, 1]
    assert allocate_counts([900, 100], [2, 10], 6) == [2, 4]  # capped by the site's sources


def test_make_plan_names_tokens_and_scores():
    plan = make_plan([["b", "a"], ["c"]], strategy="conflictPCA",
                     tokens={"a": 3, "b": 4, "c": 5}, scores={"a": [1], "b": [2], "c": [3]},
                     explained_variance=[0.5], settings={"centered": True})
    assert [p.name for p in plan.partitions] == ["p0", "p1"]
    assert [p.tokens for p in plan.partitions] == [7, 5]
    assert plan.partitions[0].site is None and plan.settings["centered"] is True
    assert plan.scores == {"a": [1.0], "b": [2.0], "c": [3.0]}
