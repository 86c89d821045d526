"""Difficulty estimators: ``score(request) -> Difficulty`` in [0, 1], and a registry.

A higher score means the request more likely needs a stronger (costlier) tier. Two ship:

- ``heuristic``: no model; a fixed, hand-weighted logistic combination of the shape
  features of :mod:`gateway.routing.features` (length, multi-step and compound tasks,
  near-identical answer options, formulas, code, time-specific facts, context depth).
- ``learned``: the same features and their pairwise products, weights fitted by
  ``joulegate router train`` on ``routing-data`` and shipped as ``router_model.json`` beside
  this module. It is a ridge regression of the *gain* of sending a prompt to the strong
  model (strong right minus weak right: +1, 0 or -1), i.e. the expected quality the strong
  model buys, which is what routing should rank by (relative to a typical prompt). The score is that prediction's quantile
  among the training prompts, so a threshold of 0.8 sends about the hardest 20% up.
- ``semantic``: the strong model's expected gain from the prompt's WordLlama embedding
  (its nearest labelled prompts, or a linear head) blended with the shape features
  (:mod:`gateway.routing.semantic`), trained on every labelled source by
  ``joulegate router train`` and shipped as ``semantic_model.npz``; the score is again a
  quantile among the training prompts. Needs the ``wordllama`` package (the ``models``
  extra): without it the estimator refuses to load, so a policy naming it is refused.

Add an estimator by subclassing :class:`DifficultyEstimator` and registering it in
:data:`ESTIMATORS`.
"""

from __future__ import annotations

import abc
import bisect
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from backends import GenerationRequest, TokenLogprob

from .features import RequestText, extract
from .semantic import SEMANTIC_FILE, Neighbour, SemanticModel

MODEL_FILE = Path(__file__).with_name("router_model.json")


class _ArtefactModel(TypedDict):
    features: list[str]
    degree: int
    mean: list[float]
    scale: list[float]
    weights: list[float]
    quantiles: list[float]


class Artefact(_ArtefactModel, total=False):
    """``router_model.json``: the fitted model, and how it was trained."""

    meta: dict[str, Any]


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
    WEIGHTS: ClassVar[dict[str, float]] = {
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


def interaction_pairs(k: int) -> list[tuple[int, int]]:
    """Index pairs (i <= j) of the degree-2 terms appended to ``k`` base features."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def quantile_score(quantiles: list[float], prediction: float, tail: float) -> float:
    """``prediction``'s quantile among sorted training predictions, in (0, 1), interpolated.

    The table's quantiles fill [tail, 1 - tail]; predictions beyond the training range map
    into the two tails, decaying with their distance in units of that range, so prompts
    unlike any training prompt keep their order instead of all scoring 0 or 1."""
    q = quantiles
    width = max(q[-1] - q[0], 1e-12)
    if prediction <= q[0]:
        return tail / (1.0 + (q[0] - prediction) / width)
    if prediction >= q[-1]:
        return 1.0 - tail / (1.0 + (prediction - q[-1]) / width)
    i = bisect.bisect_right(q, prediction)
    lo, hi = q[i - 1], q[i]
    frac = (prediction - lo) / (hi - lo) if hi > lo else 0.0
    return tail + (1 - 2 * tail) * (i - 1 + frac) / (len(q) - 1)


class LearnedEstimator(DifficultyEstimator):
    """A linear model of the strong model's expected gain; see the module docstring."""

    name = "learned"
    #: Score width of each tail beyond the training prompts' range.
    TAIL = 0.01

    def __init__(self, artefact: Artefact):
        self.features: list[str] = artefact["features"]
        self.degree: int = artefact["degree"]
        self.pairs = interaction_pairs(len(self.features)) if self.degree == 2 else []
        self.mean: list[float] = artefact["mean"]
        self.scale: list[float] = artefact["scale"]
        self.weights: list[float] = artefact["weights"]
        #: Sorted predictions on the training prompts: the score is a quantile among them.
        self.quantiles: list[float] = artefact["quantiles"]
        self.meta: dict[str, Any] = artefact.get("meta", {})
        # predict() folded once: sum(w (t - m) / s) = sum((w / s) t) - sum(w m / s), and the
        # products' coefficients as one row per base feature i (its pairs (i, j >= i) are
        # consecutive), so a zero feature skips its whole row.
        coef = [w / s for w, s in zip(self.weights, self.scale, strict=True)]
        self._offset = math.fsum(c * m for c, m in zip(coef, self.mean, strict=True))
        k = len(self.features)
        self._linear = coef[:k]
        self._rows: list[list[float]] = []
        if self.pairs:
            at = k
            for i in range(k):
                self._rows.append(coef[at:at + k - i])
                at += k - i

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> LearnedEstimator:
        return cls(json.loads(Path(path).read_text()))

    def terms(self, features: dict[str, float]) -> list[float]:
        """The model's inputs: the base features, then their pairwise products."""
        x = [features[n] for n in self.features]
        return x + [x[i] * x[j] for i, j in self.pairs]

    def predict(self, features: dict[str, float]) -> float:
        """Expected gain of the strong model on this prompt, relative to its mean gain over
        the training prompts (0: a typical prompt)."""
        x = [features[n] for n in self.features]
        total: float = sum(map(operator.mul, self._linear, x)) - self._offset
        for i, row in enumerate(self._rows):
            if x[i]:
                total += x[i] * sum(map(operator.mul, row, x[i:]))
        return total

    def to_score(self, prediction: float) -> float:
        """The prediction's quantile among training prompts, in (0, 1), interpolated.

        The table's quantiles fill [TAIL, 1 - TAIL]; predictions beyond the training range
        map into the two tails, decaying with their distance in units of that range, so
        prompts unlike any training prompt (code, say) keep their order instead of all
        scoring 0 or 1."""
        return quantile_score(self.quantiles, prediction, self.TAIL)

    def score_text(self, text: RequestText) -> Difficulty:
        features = extract(text)
        return Difficulty(self.to_score(self.predict(features)), features)


class SemanticEstimator(DifficultyEstimator):
    """Embedding neighbours (or a linear head) blended with shape features; see
    :mod:`gateway.routing.semantic`. Loading needs ``wordllama``; scoring does no I/O."""

    name = "semantic"
    TAIL = 0.01

    def __init__(self, model: SemanticModel):
        self.model = model

    @classmethod
    def load(cls, path: Path = SEMANTIC_FILE) -> SemanticEstimator:
        return cls(SemanticModel.load(path))

    def score_text(self, text: RequestText) -> Difficulty:
        prediction, features = self.model.predict_text(text)
        return Difficulty(quantile_score(self.model.quantiles, prediction, self.TAIL), features)

    def explain(self, request: GenerationRequest, k: int = 5) -> list[Neighbour]:
        """The ``k`` labelled training prompts most similar to this request's, with the
        cheap and strong tiers' outcomes on them."""
        return self.model.neighbours(RequestText.of(request), k)


def confidence(logprobs: list[float], statistic: str = "mean") -> float:
    """How sure a cascade probe's tokens were, in [0, 1] (1.0 for none): ``mean``, the
    geometric mean of their probabilities, ``exp(mean log-probability)``; ``min``, the
    probability of the least likely one (one unsure token in a run of sure ones is what a
    wrong answer tends to show)."""
    if not logprobs:
        return 1.0
    if statistic == "min":
        return math.exp(min(logprobs))
    return math.exp(sum(logprobs) / len(logprobs))


#: Bytes of a request's text that must be found among the scored tokens to read only its own.
_MIN_MATCH = 8


def prompt_confidence(tokens: Sequence[TokenLogprob], text: str, statistic: str = "mean"
                      ) -> float:
    """How likely a model found ``text`` (a request's last user turn, or its prompt), from
    its scores of the prompt's last tokens: the :func:`confidence` of the tokens that spell
    ``text`` (its longest end found among them, where it last occurs: only the prompt's end
    may have been scored), so that a chat template's own tokens around it, sure whatever the
    request, are left out; of all of them when not even the text's last characters are
    there (a template that rewrote it)."""
    spelled = [bytes(t.bytes) if t.bytes is not None else t.token.encode() for t in tokens]
    joined = b"".join(spelled)
    wanted = text.strip().encode()
    # The longest end of the text found (if an end is there, every shorter one is too).
    lo, hi = 0, len(wanted)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if joined.rfind(wanted[-mid:]) >= 0:
            lo = mid
        else:
            hi = mid - 1
    if lo < min(len(wanted), _MIN_MATCH):
        return confidence([t.logprob for t in tokens], statistic)
    start = joined.rfind(wanted[-lo:])
    end, at, inside = start + lo, 0, []
    for token, piece in zip(tokens, spelled, strict=True):
        if at < end and at + len(piece) > start:
            inside.append(token.logprob)
        at += len(piece)
    return confidence(inside, statistic)


def with_prior(confidence: float, difficulty: float, weight: float) -> float:
    """A cascade probe's ``confidence`` lowered by a one-shot estimator's ``difficulty`` of
    the same request (``routing.cascade.prior``): ``confidence * exp(-weight * difficulty)``,
    i.e. ``weight`` nats of log-probability per unit of difficulty."""
    return confidence * math.exp(-weight * difficulty)


class CascadeEstimator(DifficultyEstimator):
    """``cascade``: no score up front (0 for every request), so ``auto`` starts on the
    default tier; :mod:`gateway.cascade` escalates when that tier's first tokens are unsure
    (their :func:`confidence`)."""

    name = "cascade"

    def score_text(self, text: RequestText) -> Difficulty:
        return Difficulty(0.0, {})


#: name → factory. Factories, not instances: a snapshot builds the ones its policy names.
ESTIMATORS: dict[str, Callable[[], DifficultyEstimator]] = {
    HeuristicEstimator.name: HeuristicEstimator,
    CascadeEstimator.name: CascadeEstimator,
    LearnedEstimator.name: LearnedEstimator.load,
    SemanticEstimator.name: SemanticEstimator.load,
}


def create_estimator(name: str) -> DifficultyEstimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(f"unknown difficulty estimator '{name}'; expected one of: "
                         f"{', '.join(sorted(ESTIMATORS))}") from None
