"""No strategy plans a partition that cannot train (issue 12 point 2): K follows the number of
sources (or source groups) when there are fewer. Driven through the profiling stage's own
dispatcher (`split_sources`) and `make_plan`, as the profile stage calls them."""

from __future__ import annotations

import random

import pytest

from merit_trainer.profiling.stage import split_sources
from meritrun.api import PartitioningSpec
from meritrun.errors import SpecError
from meritrun.partitioning import balanced_split, make_plan


def plan_for(partitioning: PartitioningSpec, names, tokens, *, site_of=None, scores=None):
    settings: dict = {}
    parts = split_sources(partitioning, names, tokens, scores=scores, site_of=site_of or {},
                          settings=settings)
    return make_plan(parts, strategy=partitioning.strategy, tokens=tokens,
                     site_of=site_of or {}, scores=scores)


def test_four_sources_at_one_pull_site_give_four_trainable_partitions():
    # The case that sank a run: a pull site's tokens are unknown at the hub (counted 0), and
    # the greedy balance put every source in p0, leaving p1..p3 empty.
    names = ["reverse", "upper", "sort", "copy"]
    tokens = dict.fromkeys(names, 0)
    plan = plan_for(PartitioningSpec(strategy="bySite"), names, tokens,
                    site_of=dict.fromkeys(names, "lab"))
    assert [len(p.sources) for p in plan.partitions] == [1, 1, 1, 1]
    assert sorted(s for p in plan.partitions for s in p.sources) == sorted(names)


def test_k_follows_the_sources_when_fewer():
    names = ["a", "b"]
    plan = plan_for(PartitioningSpec(strategy="bySite", partitions=8), names, {"a": 5, "b": 0},
                    site_of={"a": None, "b": "lab"})
    assert [p.sources for p in plan.partitions] == [["a"], ["b"]]
    plan = plan_for(PartitioningSpec(strategy="random", partitions=8), names, {"a": 0, "b": 0})
    assert len(plan.partitions) == 2


@pytest.mark.parametrize("seed", range(40))
def test_no_strategy_plans_an_empty_partition(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    names = [f"s{i}" for i in range(n)]
    tokens = {s: rng.choice([0, 0, 1, rng.randint(1, 10**6)]) for s in names}
    site_of = {s: rng.choice([None, "lab", "east"]) for s in names}
    scores = {s: [rng.choice([0.0, rng.uniform(-1, 1)]) for _ in range(3)] for s in names}
    k = rng.randint(1, 16)
    for spec, kw in [
        (PartitioningSpec(strategy="bySite", partitions=k), {"site_of": site_of}),
        (PartitioningSpec(strategy="bySite", partitions=k), {"site_of": site_of,
                                                            "scores": scores}),
        (PartitioningSpec(strategy="random", partitions=k, seed=seed), {}),
        (PartitioningSpec(strategy="conflictPCA", axes=rng.randint(0, 3)), {"scores": scores}),
    ]:
        plan = plan_for(spec, names, tokens, **kw)
        assert all(p.sources for p in plan.partitions), (spec, plan)
        assert sorted(s for p in plan.partitions for s in p.sources) == sorted(names)
        assert [p.name for p in plan.partitions] == [f"p{i}" for i in range(len(plan.partitions))]


def test_balanced_split_spreads_unknown_tokens():
    assert balanced_split(["a", "b", "c"], {"a": 0, "b": 0, "c": 0}, 3) == [["a"], ["b"], ["c"]]


def test_make_plan_drops_empty_partitions_and_renumbers(caplog):
    plan = make_plan([["a"], [], ["b"]], strategy="manual", tokens={"a": 1, "b": 2})
    assert [(p.name, p.sources) for p in plan.partitions] == [("p0", ["a"]), ("p1", ["b"])]
    assert "dropped 1 empty partition" in caplog.text
    with pytest.raises(SpecError, match="no partition with a source"):
        make_plan([[]], strategy="manual", tokens={})
