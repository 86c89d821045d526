"""Difficulty estimators: ``score(request) -> Difficulty`` in [0, 1], and a registry.

A higher score means the request more likely needs a stronger (costlier) tier. Two ship:

- ``heuristic``: no model; a fixed, hand-weighted logistic combination of the shape
  features of :mod:`gateway.routing.features` (length, multi-step and compound tasks,
  near-identical answer options, formulas, code, time-specific facts, context depth).
- ``learned``: the same features, weights fitted by ``joulegate router train`` on
  ``routing-data`` and shipped as ``router_model.json`` beside this module. It is two
  logistic models — P(weak model wrong) and P(strong model right) — whose product is the
  probability that the strong model is needed; the score is that probability's quantile
  among the training prompts, so a threshold of 0.8 sends about the hardest 20% up.

Add an estimator by subclassing :class:`DifficultyEstimator` and registering it in
:data:`ESTIMATORS`.
"""

from __future__ import annotations

import abc
import bisect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backends import GenerationRequest

from .features import RequestText, extract

MODEL_FILE = Path(__file__).with_name("router_model.json")


@dataclass(frozen=True, slots=True)
class Difficulty:
    score: float
    #: The features the score was computed from (name → value), for explanations.
    features: dict[str, float]


class DifficultyEstimator(abc.ABC):
    name: str

    @abc.abstractmethod
    def score_text(self, text: RequestText) -> Difficulty: ...

    def score(self, request: GenerationRequest) -> Difficulty:
        return self.score_text(RequestText.of(request))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0


class HeuristicEstimator(DifficultyEstimator):
    """Fixed weights, set by judgement (not fitted): each feature is in [0, 1]."""

    name = "heuristic"
    BIAS = -3.0
    WEIGHTS = {
        "length": 2.0,            # long prompts carry more to read and reason over
        "context": 0.8,           # earlier turns to take into account
        "turns": 0.4,
        "steps": 1.2,             # "prove", "step by step", "design", "compare" ...
        "compound": 1.5,          # several independent claims to judge at once
        "option_overlap": 2.5,    # near-identical answer options: fine distinctions
        "logic": 0.8,
        "math": 0.6,
        "compute": 0.5,
        "code": 0.8,
        "years": 0.6,             # time-specific facts small models rarely know
        "open_ended": 0.4,
        "max_tokens": 0.6,        # the caller expects a long answer
    }

    def score_text(self, text: RequestText) -> Difficulty:
        features = extract(text)
        z = self.BIAS + sum(w * features[k] for k, w in self.WEIGHTS.items())
        return Difficulty(_sigmoid(z), features)


class LearnedEstimator(DifficultyEstimator):
    """Two logistic models over standardised features; see the module docstring."""

    name = "learned"
    #: Score width of each tail beyond the training prompts' range.
    TAIL = 0.01

    def __init__(self, artefact: dict):
        self.features: list[str] = artefact["features"]
        self.mean: list[float] = artefact["mean"]
        self.scale: list[float] = artefact["scale"]
        self.models = [(m["bias"], m["weights"]) for m in (artefact["weak_wrong"],
                                                           artefact["strong_right"])]
        #: Sorted probabilities of the training prompts: the score is a quantile among them.
        self.quantiles: list[float] = artefact["quantiles"]
        self.meta: dict = artefact.get("meta", {})

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> LearnedEstimator:
        return cls(json.loads(Path(path).read_text()))

    def probability(self, features: dict[str, float]) -> float:
        x = [(features[n] - m) / s for n, m, s in zip(self.features, self.mean, self.scale)]
        p = 1.0
        for bias, weights in self.models:
            p *= _sigmoid(bias + sum(w * v for w, v in zip(weights, x)))
        return p

    def to_score(self, probability: float) -> float:
        """The probability's quantile among training prompts, in [0, 1], interpolated.

        The table's quantiles fill [TAIL, 1 - TAIL]; probabilities beyond the training range
        map linearly into the two tails, so prompts unlike any training prompt (code, say)
        keep their order instead of all scoring 0 or 1."""
        q, tail = self.quantiles, self.TAIL
        if probability <= q[0]:
            return tail * probability / q[0] if q[0] > 0 else 0.0
        if probability >= q[-1]:
            return 1.0 - tail * (1.0 - probability) / (1.0 - q[-1]) if q[-1] < 1 else 1.0
        i = bisect.bisect_right(q, probability)
        lo, hi = q[i - 1], q[i]
        frac = (probability - lo) / (hi - lo) if hi > lo else 0.0
        return tail + (1 - 2 * tail) * (i - 1 + frac) / (len(q) - 1)

    def score_text(self, text: RequestText) -> Difficulty:
        features = extract(text)
        return Difficulty(self.to_score(self.probability(features)), features)


#: name → factory. Factories, not instances: a snapshot builds the ones its policy names.
ESTIMATORS: dict[str, Callable[[], DifficultyEstimator]] = {
    HeuristicEstimator.name: HeuristicEstimator,
    LearnedEstimator.name: LearnedEstimator.load,
}


def create_estimator(name: str) -> DifficultyEstimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(f"unknown difficulty estimator '{name}'; expected one of: "
                         f"{', '.join(sorted(ESTIMATORS))}") from None
