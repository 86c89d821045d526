"""How an APGR compares with routing by chance (NumPy): a permutation test.

A held-out source of a few hundred labelled prompts gives an APGR that moves by several
hundredths with the luck of which prompts were drawn: random routing itself, whose APGR is
0.5 in expectation, scores anywhere from about 0.38 to 0.62 on 200 prompts of our own
tiers' labels. :func:`chance` draws random orders of the same prompts (the same gains, so
the same cheap and strong quality) and gives the spread of their APGRs, and how often a
random order does at least as well as an estimator's: the one-sided p-value of "this
ranking is better than chance" on this source.

The null keeps the estimator's ties: an estimator with few distinct scores draws a curve of
few steps, whose APGR varies less by chance than one of many, so its random orders are dealt
into the same steps. It depends only on how many prompts there are, how many the strong tier
gains or loses on, and where the steps end, so it is drawn once per such shape (cached).
Draws are seeded: a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

#: Random orders drawn per null; the p-value's resolution is 1 / (DRAWS + 1).
DRAWS = 2000
#: The level below which an APGR is called better than chance.
LEVEL = 0.05
#: Orders drawn at a time (bounds memory: the largest source has ~12,000 prompts).
_CHUNK = 100


@dataclass(frozen=True)
class Chance:
    """The APGRs of :data:`DRAWS` random orders of one set of labelled prompts."""

    apgrs: NDArray[np.float64]  # sorted

    @property
    def band(self) -> tuple[float, float]:
        """The middle 95% of random orders' APGRs."""
        import numpy as np

        low, high = np.quantile(self.apgrs, [0.025, 0.975])
        return float(low), float(high)

    def p(self, apgr: float) -> float:
        """The share of random orders scoring at least ``apgr`` (counting the observed one
        as a draw, so never 0)."""
        import numpy as np

        at_least = len(self.apgrs) - int(np.searchsorted(self.apgrs, apgr - 1e-9, "left"))
        return (1 + at_least) / (1 + len(self.apgrs))


def mean_p(apgrs: Sequence[float], nulls: Sequence[Chance], seed: int = 0) -> float:
    """How often random routing on each of several sources at once, averaged over them,
    scores at least the mean of ``apgrs`` (one per source, with its null): each source's
    draws taken in a random order (which makes the sorted draws a sample again), paired
    across sources and averaged."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.mean([rng.permutation(n.apgrs) for n in nulls], axis=0)
    return Chance(np.sort(means)).p(sum(apgrs) / len(apgrs))


def chance(gains: Sequence[float], scores: Sequence[float] | None = None,
           draws: int = DRAWS) -> Chance | None:
    """Random routing's APGRs on prompts whose strong-less-cheap gains are ``gains`` (1, 0 or
    -1 each): the gains dealt at random to the prompts, ranked by ``scores`` (an estimator's:
    prompts it ties are one step of its curve, as :func:`gateway.routing.train.routing_curve`
    draws it), or with no ties (``None``: a router whose every score differs). ``None`` when
    the tiers never differ in total (APGR is undefined)."""
    up = sum(1 for g in gains if g > 0)
    down = sum(1 for g in gains if g < 0)
    if up == down:
        return None
    n = len(gains)
    if scores is None:
        ends: tuple[int, ...] = tuple(range(n + 1))
    else:
        ordered = sorted(scores, reverse=True)
        ends = (0, *(i for i in range(1, n) if ordered[i] != ordered[i - 1]), n)
    return _draw(n, up, down, ends, draws)


@lru_cache(maxsize=256)
def _draw(n: int, up: int, down: int, ends: tuple[int, ...], draws: int) -> Chance:
    import numpy as np

    gains = np.zeros(n)
    gains[:up], gains[up:up + down] = 1.0, -1.0
    total = up - down
    steps = np.asarray(ends)
    widths = np.diff(steps) / n
    rng = np.random.default_rng([n, up, down, len(ends), draws])
    out = []
    for start in range(0, draws, _CHUNK):
        orders = rng.permuted(np.tile(gains, (min(_CHUNK, draws - start), 1)), axis=1)
        cumulative = np.concatenate([np.zeros((len(orders), 1)), np.cumsum(orders, axis=1)],
                                    axis=1)
        # PGR at the end of each tied block (within one the order is arbitrary: the curve
        # is the straight line across it), then the trapezoids over the strong share.
        pgr = cumulative[:, steps] / total
        out.append(((pgr[:, 1:] + pgr[:, :-1]) / 2) @ widths)
    return Chance(np.sort(np.concatenate(out)))
