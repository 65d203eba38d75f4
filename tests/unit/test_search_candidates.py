"""Candidate grids, ranking, table and plot of the mixture search (no model, no torch)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from merit_merger.cli_search import make_candidates
from merit_merger.evaluation import json_safe
from merit_merger.search import dirichlet_candidates, objective_score, rank_order, simplex_grid
from merit_merger.search_plot import format_ranking_table, plot_search, ternary_xy
from meritrun.api.limits import lattice_candidates
from meritrun.errors import SpecError


def on_simplex(points, *, floor: float = 0.0) -> bool:
    return all(math.isclose(sum(p), 1.0, abs_tol=1e-12) and min(p) >= floor - 1e-12
               for p in points)


def test_two_expert_grid_is_w1_in_eighths():
    points = simplex_grid(2)
    assert [Fraction(p[0]).limit_denominator(8) for p in points] == [
        Fraction(k, 8) for k in range(1, 8)]
    assert on_simplex(points, floor=1 / 8)


def test_three_expert_grid_has_21_lattice_points_with_min_weight():
    points = simplex_grid(3, 8, 1 / 8)
    assert len(points) == 21 == len(set(points))
    assert on_simplex(points, floor=1 / 8)
    assert all(abs(w * 8 - round(w * 8)) < 1e-12 for p in points for w in p)
    assert (0.125, 0.625, 0.25) in points and (0.25, 0.25, 0.5) in points


@pytest.mark.parametrize(("n", "denominator", "floor", "count"), [
    (1, 8, None, 1), (3, 8, 0.0, 45), (4, 8, None, 35), (3, 4, None, 3), (9, 8, None, 0),
])
def test_grid_counts_are_the_compositions(n, denominator, floor, count):
    points = simplex_grid(n, denominator, floor)
    assert len(points) == count
    assert on_simplex(points, floor=floor or 0.0)


def test_dirichlet_candidates_are_uniform_plus_seeded_draws():
    points = dirichlet_candidates(4, 20, seed=3)
    assert len(points) == 21 and points[0] == (0.25,) * 4
    assert on_simplex(points) and all(min(p) > 0 for p in points)
    assert points == dirichlet_candidates(4, 20, seed=3)
    assert points[1:] != dirichlet_candidates(4, 20, seed=4)[1:]
    assert len({p for p in points}) == 21


def test_make_candidates_picks_the_grid_or_the_draws():
    assert make_candidates(3, grid=8) == simplex_grid(3)
    assert len(make_candidates(4, dirichlet=20)) == 21
    with pytest.raises(SpecError, match="no point"):
        make_candidates(9, grid=8)


def test_rank_order_follows_the_objective_direction_with_nan_last():
    scores = [2.0, math.nan, 1.0, 3.0, 1.0]
    assert rank_order(scores, "mean-loss") == [2, 4, 0, 3, 1]
    assert rank_order(scores, "weighted") == [2, 4, 0, 3, 1]
    assert rank_order(scores, "mean-accuracy") == [3, 0, 2, 4, 1]


def test_unknown_objective_is_a_spec_error():
    with pytest.raises(SpecError, match="objective"):
        objective_score(None, "perplexity")


def fake_search(names: list[str], points, direction: str = "min") -> dict:
    scores = [sum((i + 1) * w for i, w in enumerate(p)) for p in points]
    order = sorted(range(len(points)), key=lambda i: scores[i], reverse=direction == "max")
    ranking = [{"rank": r, "candidate": i, "weights": dict(zip(names, points[i], strict=True)),
                "score": scores[i], "mean_loss": scores[i], "accuracy": None}
               for r, i in enumerate(order, start=1)]
    return {"objective": "mean-loss", "direction": direction, "names": names,
            "ranking": ranking, "best": ranking[0]["weights"], "base": None}


def test_ranking_table_lists_candidates_best_first():
    search = fake_search(["code", "math", "chat"], simplex_grid(3))
    lines = format_ranking_table(search, top=5).splitlines()
    assert lines[0].split() == ["rank", "code", "math", "chat", "mean-loss", "mean_loss",
                                "accuracy"]
    assert len(lines) == 2 + 5
    assert lines[2].split()[:4] == ["1", "0.750", "0.125", "0.125"]  # lowest score: w_code high


@pytest.mark.parametrize("n", [2, 3, 4])
def test_plot_is_written_for_every_expert_count(tmp_path, n):
    points = simplex_grid(n) if n < 4 else dirichlet_candidates(4, 20, seed=0)
    path = plot_search(fake_search([f"e{i}" for i in range(n)], points), tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_ternary_corners_and_centre():
    assert ternary_xy((1, 0, 0)) == (0, 0)
    assert ternary_xy((0, 1, 0)) == (1, 0)
    x, y = ternary_xy((0, 0, 1))
    assert (x, y) == (0.5, pytest.approx(math.sqrt(3) / 2))
    cx, cy = ternary_xy((1 / 3, 1 / 3, 1 / 3))
    assert cx == pytest.approx(0.5) and cy == pytest.approx(math.sqrt(3) / 6)


def test_json_safe_turns_non_finite_numbers_into_null():
    doc = json_safe({"a": math.nan, "b": [1.0, math.inf], "c": {"d": (2, -math.inf)}})
    assert json.dumps(doc, allow_nan=False) == (
        '{"a": null, "b": [1.0, null], "c": {"d": [2, null]}}')


@pytest.mark.parametrize("grid,experts", [(8, 2), (8, 3), (8, 4), (5, 3), (12, 5)])
def test_lattice_size_is_counted_exactly_before_building(grid, experts):
    assert lattice_candidates(grid, experts) == len(simplex_grid(experts, grid))


def test_candidates_are_bounded_before_any_is_built():
    # K = 4 with grid 2000 used to exhaust memory building 1.3e9 candidates
    with pytest.raises(SpecError, match="1329336999 points for 4 experts"):
        make_candidates(4, grid=2000)
    with pytest.raises(SpecError, match="Dirichlet draws: at most 1000"):
        make_candidates(4, dirichlet=10**6)
    assert len(make_candidates(2, grid=1000)) == 999
