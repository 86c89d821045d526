"""Difficulty routing: which tier a request runs on.

- :mod:`.features` — what an estimator sees of a request;
- :mod:`.estimators` — ``score(request)`` in [0, 1] and the registry (``heuristic``,
  ``learned``);
- :mod:`.capacity` — Mixture-of-Depths style capacity windows;
- :mod:`.tiers` — the gate: thresholds, budget pressure, capacity, pins and caps;
- :mod:`.train` — training the ``learned`` estimator and the label benchmark (NumPy).
"""

from .capacity import CapacityTracker
from .estimators import ESTIMATORS, Difficulty, DifficultyEstimator, create_estimator
from .tiers import MAX_TIER_HEADER, Decision, fallback_tier, pick_tier, tenant_models

__all__ = ["ESTIMATORS", "MAX_TIER_HEADER", "CapacityTracker", "Decision", "Difficulty",
           "DifficultyEstimator", "create_estimator", "fallback_tier", "pick_tier",
           "tenant_models"]
