"""Difficulty routing: which tier a request runs on, decided from plain data.

- :mod:`.features` — what an estimator sees of a request;
- :mod:`.estimators` — ``score(request)`` in [0, 1] and the registry (``heuristic``,
  ``learned``);
- :mod:`.capacity` — Mixture-of-Depths style capacity windows;
- :mod:`.tiers` — the gate: thresholds, budget pressure, capacity, pins and caps, over a
  :class:`RouteContext`; refusals are :class:`RouteRefusal` exceptions;
- :mod:`.plan` — the request's :class:`TierPlan`: the routed tier, where a budget degrade
  or a failure may move it, and why it moved;
- :mod:`.train` — training the ``learned`` estimator and the label benchmark (NumPy).
"""

from .capacity import CapacityTracker
from .estimators import ESTIMATORS, Difficulty, DifficultyEstimator, create_estimator
from .plan import TierPlan, degrade_ladder
from .tiers import (
    MAX_TIER_HEADER,
    AboveMaxTier,
    Decision,
    ModelNotFound,
    RouteContext,
    RouteRefusal,
    pick_tier,
    tenant_models,
)

__all__ = ["ESTIMATORS", "MAX_TIER_HEADER", "AboveMaxTier", "CapacityTracker", "Decision",
           "Difficulty", "DifficultyEstimator", "ModelNotFound", "RouteContext", "RouteRefusal",
           "TierPlan", "create_estimator", "degrade_ladder", "pick_tier", "tenant_models"]
