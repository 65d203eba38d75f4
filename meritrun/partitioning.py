"""Split strategies: which sources train together (MERIT step 5 and its baselines).

Pure Python (no numpy, no torch) so the control plane, the CLI and the tests can all run it.
Sources are atomic: a source is never divided between partitions. Every strategy returns
`list[list[str]]` (the sources of each partition, in a deterministic order); `make_plan` turns
that into the `plan.json` model. The conflict scores come from the profiling stage; this module
does not compute them.

The conflict split is a recursive token-weighted median split: at depth d the group is sorted
by its score on axis d and cut where the two sides' token masses are as equal as the atomic
sources allow. A group with a single source cannot be cut, so fewer than 2^r partitions come
out (logged and visible in the plan).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence

from .errors import SpecError
from .stages import Plan, PlannedPartition, partition_name

log = logging.getLogger(__name__)


def tie_ranks(names: Sequence[str], *, seed: int) -> dict[str, int]:
    """A seeded total order of the names, used only to break ties between equal scores."""
    order = sorted(set(names))
    random.Random(f"meritrun-ties:{seed}").shuffle(order)
    return {name: i for i, name in enumerate(order)}


def best_cut(masses: Sequence[int], *, left_share: int = 1, total_share: int = 2) -> int:
    """Index c (1 <= c < len) splitting masses into [:c] and [c:] with the left side's mass
    closest to left_share/total_share of the whole (both sides non-empty).

    Integer arithmetic, so the result does not depend on float rounding; among equally good
    cuts the smallest index wins.
    """
    if len(masses) < 2:
        raise ValueError("need at least two sources to cut")
    total, left = sum(masses), 0
    best, best_gap = 1, None
    for c in range(1, len(masses)):
        left += masses[c - 1]
        gap = abs(total_share * left - left_share * total)
        if best_gap is None or gap < best_gap:
            best, best_gap = c, gap
    return best


def _median_split(
    group: list[str],
    k: int,
    depth: int,
    *,
    scores: Mapping[str, Sequence[float]],
    tokens: Mapping[str, int],
    axes: int,
    ranks: Mapping[str, int],
) -> list[list[str]]:
    """Split group into (up to) k parts, sorting by axis depth % axes at each level.

    A part that is not cut further keeps its members in the order of the last cut's axis.
    """
    if k <= 1 or len(group) <= 1:
        return [list(group)] if group else []
    axis = depth % axes
    ordered = sorted(group, key=lambda s: (scores[s][axis], ranks[s]))
    k_left = k // 2
    cut = best_cut([tokens[s] for s in ordered], left_share=k_left, total_share=k)
    left = _median_split(ordered[:cut], k_left, depth + 1, scores=scores, tokens=tokens,
                         axes=axes, ranks=ranks)
    right = _median_split(ordered[cut:], k - k_left, depth + 1, scores=scores, tokens=tokens,
                          axes=axes, ranks=ranks)
    return left + right


def _check_tokens(sources: Sequence[str], tokens: Mapping[str, int]) -> None:
    for s in sources:
        if s not in tokens:
            raise SpecError(f"no token count for source {s!r}", path="partitioning")
        if tokens[s] < 0:
            raise SpecError(f"negative token count for source {s!r}", path="partitioning")


def _warn_if_short(parts: list[list[str]], k: int, what: str) -> None:
    if len(parts) < k:
        log.warning("%s: asked for %d partitions, got %d (too few sources to cut further)",
                    what, k, len(parts))


def conflict_split(
    scores: Mapping[str, Sequence[float]],
    tokens: Mapping[str, int],
    axes: int,
    *,
    seed: int = 0,
) -> list[list[str]]:
    """MERIT's recursive token-weighted median split into K = 2^axes partitions.

    Level d sorts each group by score on axis d (ties: seeded order) and cuts it where the
    token masses are closest to equal. A group of one source stays whole, so K can come out
    smaller. Partitions are listed left to right along axis 1, then axis 2, ...
    """
    sources = list(scores)
    if not sources:
        raise SpecError("no sources to split", path="partitioning")
    if axes < 0:
        raise SpecError(f"axes must be >= 0, got {axes}", path="partitioning.axes")
    short = [s for s in sources if len(scores[s]) < axes]
    if short:
        raise SpecError(f"source {short[0]!r} has {len(scores[short[0]])} scores, need {axes}",
                        path="partitioning.axes")
    _check_tokens(sources, tokens)
    if axes == 0:
        return [sorted(sources)]
    parts = _median_split(sources, 2**axes, 0, scores=scores, tokens=tokens, axes=axes,
                          ranks=tie_ranks(sources, seed=seed))
    _warn_if_short(parts, 2**axes, "conflict split")
    return parts


def balanced_split(sources: Sequence[str], tokens: Mapping[str, int], k: int) -> list[list[str]]:
    """Greedy token balance without randomness: largest source first into the lightest part.

    Ties go to the part with fewer sources, so sources whose tokens are unknown here (counted
    as 0: they stay at a pull site) still spread one per part and no part is left empty.
    """
    _check_tokens(sources, tokens)
    k = min(k, len(sources))
    parts: list[list[str]] = [[] for _ in range(k)]
    mass = [0] * k
    for s in sorted(sources, key=lambda s: (-tokens[s], s)):
        i = min(range(k), key=lambda j: (len(parts[j]) > 0, mass[j], len(parts[j]), j))
        parts[i].append(s)
        mass[i] += tokens[s]
    return [sorted(p) for p in parts]


def random_split(
    sources: Sequence[str], tokens: Mapping[str, int], k: int, *, seed: int
) -> list[list[str]]:
    """Random baseline: a seeded shuffle, then each source goes to the lightest partition.

    The first k sources of the shuffle seed one partition each, so none is empty; the greedy
    fill keeps token masses close while the membership is random. k above the number of
    sources gives one source per partition.
    """
    if k < 1:
        raise SpecError(f"need at least one partition, got {k}", path="partitioning.partitions")
    _check_tokens(sources, tokens)
    order = sorted(set(sources))
    random.Random(f"meritrun-random:{seed}").shuffle(order)
    k = min(k, len(order))
    parts: list[list[str]] = [[] for _ in range(k)]
    mass = [0] * k
    for s in order:
        i = min(range(k), key=lambda j: (len(parts[j]) > 0, mass[j], j))
        parts[i].append(s)
        mass[i] += tokens[s]
    return [sorted(p) for p in parts]


def manual_split(assignments: Sequence[Sequence[str]], sources: Sequence[str]) -> list[list[str]]:
    """The user's own partitions, checked: every known source exactly once, none empty."""
    path = "spec.partitioning.assignments"
    known, seen = set(sources), {}
    for i, part in enumerate(assignments):
        if not part:
            raise SpecError(f"partition {i} is empty", path=path)
        for s in part:
            if s not in known:
                raise SpecError(f"source {s!r} (partition {i}) is not in the data", path=path)
            if s in seen:
                raise SpecError(f"source {s!r} is in partitions {seen[s]} and {i}", path=path)
            seen[s] = i
    missing = [s for s in sources if s not in seen]
    if missing:
        raise SpecError(f"source {missing[0]!r} is in no partition", path=path)
    return [list(p) for p in assignments]


def allocate_counts(masses: Sequence[int], sizes: Sequence[int], k: int) -> list[int]:
    """Partitions per group: at least one each, the rest one at a time to the group furthest
    below its token-proportional share (earlier group on ties), never more partitions than a
    group has sources."""
    n = len(masses)
    alloc = [1] * n
    total = sum(masses)
    share = [(m / total * k) if total else k / n for m in masses]
    for _ in range(k - n):
        open_groups = [g for g in range(n) if alloc[g] < sizes[g]]
        if not open_groups:
            break
        alloc[max(open_groups, key=lambda g: (share[g] - alloc[g], -g))] += 1
    return alloc


def by_site_split(
    sources: Sequence[str],
    tokens: Mapping[str, int],
    site_of: Mapping[str, str | None],
    k: int,
    *,
    scores: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
) -> list[list[str]]:
    """Partitions that never mix sites; a source bound to a site stays at that site.

    Sources with no site (None or absent) form the hub's group. Each site gets at least one
    partition (so K grows to the number of sites if needed), the rest by token mass. Inside a
    site: the conflict median split when scores are given, else the greedy token balance.
    """
    _check_tokens(sources, tokens)
    groups: dict[str | None, list[str]] = {}
    for s in sources:
        groups.setdefault(site_of.get(s), []).append(s)
    members_of = list(groups.values())
    if len(groups) > k:
        log.warning("bySite: %d sites need %d partitions (asked for %d)", len(groups),
                    len(groups), k)
    counts = allocate_counts([sum(tokens[s] for s in m) for m in members_of],
                             [len(m) for m in members_of], max(k, 1))
    parts: list[list[str]] = []
    for members, n in zip(members_of, counts, strict=True):
        if scores is not None:
            axes = max(1, min(len(scores[s]) for s in members))
            parts += _median_split(members, n, 0, scores=scores, tokens=tokens, axes=axes,
                                   ranks=tie_ranks(members, seed=seed))
        else:
            parts += balanced_split(members, tokens, n)
    return parts


def make_plan(
    partitions: Sequence[Sequence[str]],
    *,
    strategy: str,
    tokens: Mapping[str, int],
    site_of: Mapping[str, str | None] | None = None,
    scores: Mapping[str, Sequence[float]] | None = None,
    explained_variance: Sequence[float] | None = None,
    settings: Mapping | None = None,
) -> Plan:
    """The plan.json model: partitions p0, p1, ... with their sources, tokens and site.

    A partition's site is the site shared by all its sources; a partition mixing sites (only
    possible outside bySite) gets none, with a warning. Empty partitions are never planned:
    they are dropped and the rest renumbered (K follows the number of sources or groups).
    """
    site_of = site_of or {}
    empty = sum(1 for members in partitions if not members)
    if empty:  # K follows the sources: a partition with nothing to train would only fail
        log.warning("plan: dropped %d empty partition(s); K = %d", empty,
                    len(partitions) - empty)
    partitions = [members for members in partitions if members]
    if not partitions:
        raise SpecError("the plan has no partition with a source", path="spec.partitioning")
    planned = []
    for i, members in enumerate(partitions):
        sites = {site_of.get(s) for s in members}
        if len(sites) > 1:
            log.warning("partition %s mixes sites %s; use strategy bySite to keep data at its "
                        "site", partition_name(i), sorted(map(str, sites)))
        site = sites.pop() if len(sites) == 1 else None
        planned.append(PlannedPartition(
            name=partition_name(i), index=i, sources=list(members),
            tokens=sum(tokens[s] for s in members), site=site,
        ))
    return Plan(
        strategy=strategy, partitions=planned, source_tokens=dict(tokens),
        scores={s: [float(x) for x in v] for s, v in scores.items()} if scores else None,
        explained_variance=[float(x) for x in explained_variance] if explained_variance else None,
        settings=dict(settings or {}),
    )
