"""Routing by chance as the yardstick of an APGR: the permutation test of
:mod:`gateway.routing.chance`, and where the router reports carry it."""

from __future__ import annotations

import itertools
import math

import pytest

from gateway.routing.chance import DRAWS, _draw, chance, mean_p
from gateway.routing.labels import Example
from gateway.routing.lodo import Cell, cell, summary
from gateway.routing.train import routing_curve

pytestmark = pytest.mark.unit

np = pytest.importorskip("numpy")


def _gains(up: int, down: int, same: int) -> list[float]:
    return [1.0] * up + [-1.0] * down + [0.0] * same


@pytest.mark.parametrize("scores", [[0.9, 0.8, 0.5, 0.2, 0.1], [0.9, 0.9, 0.5, 0.1, 0.1]],
                         ids=["distinct", "tied"])
def test_the_null_is_routing_curve_over_every_dealing_of_the_gains(scores):
    """Five prompts, gains 1, 1, -1, 0, 0: the 30 distinct ways to deal them to the scores,
    each scored by routing_curve (a tied block is one step of the curve), are the exact
    distribution the null samples: the same values, in the same proportions."""
    gains = [1.0, 1.0, -1.0, 0.0, 0.0]
    exact: dict[float, int] = {}
    dealings = set(itertools.permutations(gains))
    for dealt in dealings:
        d = np.array(dealt)
        apgr = routing_curve("x", scores, (d < 0).astype(float), (d > 0).astype(float)).apgr
        exact[round(apgr, 9)] = exact.get(round(apgr, 9), 0) + 1
    null = chance(gains, scores)
    assert null is not None
    values, counts = np.unique(np.round(null.apgrs, 9), return_counts=True)
    assert set(values) == set(exact)
    for value, count in zip(values, counts, strict=True):
        assert count / DRAWS == pytest.approx(exact[value] / len(dealings), abs=0.035)


def test_ties_narrow_what_chance_reaches():
    """Two steps of 100 prompts spread less by chance than 200 distinct scores (the curve's
    middle point alone against the mean of all of them): the same APGR is rarer for the
    coarse estimator."""
    gains = _gains(50, 15, 135)
    coarse = chance(gains, [s for s in (0.9, 0.1) for _ in range(100)])
    fine = chance(gains)
    assert coarse is not None and fine is not None
    assert coarse.apgrs.std() < 0.95 * fine.apgrs.std()
    assert coarse.p(0.6) < fine.p(0.6)
    assert chance(gains, [0.0] * 200).band == (0.5, 0.5)  # one step: always the straight line


def test_four_prompts_one_gain_by_hand():
    """One prompt of four needs the strong tier: a random order puts it first with
    probability 1/4 (APGR 0.875), second (0.625), third (0.375) or last (0.125), so the
    oracle's 0.875 is reached by about a quarter of random orders."""
    null = chance(_gains(1, 0, 3))
    assert null is not None
    assert sorted(set(np.round(null.apgrs, 6))) == [0.125, 0.375, 0.625, 0.875]
    assert null.p(0.875) == pytest.approx(0.25, abs=0.03)
    assert null.p(0.125) == 1.0  # every order does at least as well as the worst


def test_an_apgr_far_from_chance_on_many_prompts_and_within_it_on_few():
    small, large = chance(_gains(50, 15, 135)), chance(_gains(500, 150, 1350))
    assert small is not None and large is not None
    lo, hi = small.band
    assert lo < 0.5 < hi and hi - lo > 0.12  # 200 prompts: random spans over a tenth
    lo_large, hi_large = large.band
    assert lo_large < 0.5 < hi_large and hi_large - lo_large < (hi - lo) / 2
    assert small.p(0.6) > 0.01 and large.p(0.6) == pytest.approx(1 / (DRAWS + 1))
    assert small.p(0.4) > 0.9


def test_the_null_depends_on_the_counts_only_and_is_reproducible():
    a = chance(_gains(20, 5, 75))
    assert a is not None
    _draw.cache_clear()  # drawn afresh, from its seed
    b = chance(list(reversed(_gains(20, 5, 75))))
    assert b is not None and b is not a
    assert np.array_equal(a.apgrs, b.apgrs)
    assert chance(_gains(3, 3, 10)) is None  # the tiers tie in total: APGR is undefined


def test_a_cell_carries_its_p_and_the_summary_counts_sources_above_chance():
    examples = [Example("t", f"p{i}", w, s, "t", "bare")
                for i, (w, s) in enumerate([(1, 1), (0, 1), (0, 0), (1, 1)])]
    best = cell("t", "native", "x", [0.1, 0.9, 0.5, 0.2], examples)
    assert best.p == pytest.approx(0.25, abs=0.03)
    tied = [Example("t", f"q{i}", 1, 1, "t") for i in range(4)]
    assert cell("t", "native", "x", [0.0] * 4, tied).p is None
    assert cell("t", "native", "x", [0.1, 0.9, 0.5, 0.2], examples, tested=False).p is None

    def c(source: str, apgr: float, p: float) -> Cell:
        return Cell(source, "native", "heuristic", apgr, 0.5, None, None, p=p)

    cells = [c("a", 0.70, 0.001), c("b", 0.60, 0.04), c("c", 0.55, 0.2),
             c("c/file", 0.9, 0.001)]  # a file of a source is not a held-out source
    row = summary(cells)["heuristic"]
    assert (row["sources"], row["above_chance"]) == (3, 2)


def test_several_sources_near_the_edge_of_chance_are_together_past_it():
    """Two sources of 200 prompts, each ranked at 0.58: on either alone random routing does as
    well about one time in ten, on both at once (their mean) far more rarely; a mean at
    random's own expectation is reached half the time."""
    a, b = chance(_gains(50, 15, 135)), chance(_gains(45, 20, 135))
    assert a is not None and b is not None
    alone = max(a.p(0.58), b.p(0.58))
    assert 0.05 < alone < 0.25
    assert mean_p([0.58, 0.58], [a, b]) < alone / 2
    assert mean_p([0.5, 0.5], [a, b]) == pytest.approx(0.5, abs=0.05)
    assert mean_p([0.58, 0.58], [a, b]) == mean_p([0.58, 0.58], [a, b])  # seeded


def test_the_summary_gives_the_mean_its_p_where_every_source_has_a_null():
    def source(name: str, up: int) -> list[Example]:
        return [Example(name, f"{name}{i}", i >= up, True, name) for i in range(40)]

    cells = []
    for name, up in (("a", 12), ("b", 10)):
        examples = source(name, up)
        cells.append(cell(name, "native", "heuristic", [-i for i in range(40)], examples))
    row = summary(cells)["heuristic"]
    # The oracle's order on both: all the gain by 12/40 and 10/40 of the prompts sent strong.
    assert row["mean"] == pytest.approx(((1 - 0.3 / 2) + (1 - 0.25 / 2)) / 2)
    assert row["above_chance"] == 2 and row["mean_p"] == pytest.approx(1 / (DRAWS + 1))
    untested = [cell("a", "native", "heuristic", [0.0] * 40, source("a", 12), tested=False)]
    assert math.isnan(summary(untested)["heuristic"]["mean_p"])
