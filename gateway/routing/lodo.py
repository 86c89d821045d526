"""Leave-one-dataset-out benchmark of every estimator, in several wordings, and scoring
anyone's labelled CSV with the shipped estimators (NumPy).

:func:`evaluate`: each labelled source (:func:`gateway.routing.labels.load_sources`) is held
out in turn; ``learned`` and ``semantic`` are refitted on the other sources only (their
penalty, head and blend chosen by cross-validation inside those sources), ``heuristic`` has
nothing to fit; every estimator then scores the held-out source's prompts in each wording of
:data:`gateway.routing.labels.FORMATS` (the labels stay those of the wording the tiers were
asked in). Per (source, wording, estimator): APGR, the strong fraction and the joules needed
for 95% of the strong tier's quality (a sweep over the score order: no threshold is chosen on
the reported set), and, where the source has joules, the least margin over random routing at
equal joules. Random and oracle baselines are given per source. The cascade's rows rank by
the cheap tier's recorded confidences (its answer probe, its prompt signal), alone and with
the heuristic as ``routing.cascade.prior`` at the weight the training sources choose.

:func:`score_label_file`: the shipped estimators as trained in the package, nothing refitted,
on a user's ``prompt,cheap_ok,strong_ok`` CSV, with the threshold that routes traffic like the
file's at 95% of the strong tier's quality (:func:`calibrate`): a threshold does not carry over
between kinds of traffic the way a ranking does, so it is set on a sample of the traffic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from backends import GenerationRequest
from policies import CascadeSpec

from . import semantic_train
from .chance import LEVEL, Chance, chance, mean_p
from .estimators import (
    ESTIMATORS,
    DifficultyEstimator,
    LearnedEstimator,
    SemanticEstimator,
    confidence,
    with_prior,
)
from .features import RequestText, extract
from .labels import (
    FORMATS,
    MIN_PROMPTS,
    Example,
    by_source,
    load_sources,
    read_label_file,
    request_for,
)
from .semantic import Embedder, SemanticUnavailable
from .train import _designs, against_random, fit_artefact, routing_curve, select

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Floats = NDArray[np.float64]

QUALITY_SHARE = 0.95
#: Sources of our own tiers' labels with at least this many prompts are also evaluated with
#: their problems held out (:func:`seen_source`), in this many folds.
SEEN_MIN, SEEN_FOLDS = 100, 4
ESTIMATOR_NAMES = ("heuristic", "learned", "semantic")
#: ``cascade`` at the policy's default probe (:class:`policies.schema.CascadeSpec`): scored
#: on the prompts of a held-out source that carry the cheap tier's log-probabilities (when at
#: least MIN_PROMPTS do), by 1 - the confidence of the probe's tokens. It fits nothing, so no source is ever its
#: training data; its joules (it pays the probe too) are benchmarks/cascade.py's to tell.
CASCADE_PROBE = (CascadeSpec().probe_tokens, CascadeSpec().statistic)
#: The row of the cascade by its prompt signal (scored where PROMPT_SCORES has the prompt).
CASCADE_PROMPT = "cascade-prompt"
#: ``routing.cascade.prior`` in the report: each cascade row again as ``<row>+heuristic``,
#: its confidences lowered by the heuristic's score (:func:`with_prior`), at the weight of
#: PRIOR_WEIGHTS that ranks the *training* sources best (:func:`prior_weight`).
PRIOR = "heuristic"
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: A source whose APGR moves by less than this over all of :data:`PRIOR_WEIGHTS` (one
#: prompt in a hundred, about) ranks the same whatever the weight: it says nothing about
#: which weight to take, and is left out of the choice (else its noise would decide a
#: worst-source-first rule whenever nothing ranks it: MBPP, for the prompt signal).
PRIOR_MIN_SPREAD = 0.01
#: The cascade's rows: by its answer probe, by its prompt signal, each alone and with a prior.
CASCADES = ("cascade", CASCADE_PROMPT, f"cascade+{PRIOR}", f"{CASCADE_PROMPT}+{PRIOR}")
#: Fixed semantic variants measured beside the selected one, so the choice is visible:
#: embedding-only kNN and embedding-only linear head.
VARIANTS: dict[str, tuple[tuple[str, float], tuple[float, ...]]] = {
    "semantic-knn": (("knn", 16), (1.0, 0.0, 0.0)),
    "semantic-linear": (("linear", 3.0), (1.0, 0.0, 0.0)),
}


@dataclass
class Cell:
    """One estimator on one held-out source in one wording."""

    source: str
    wording: str
    estimator: str
    apgr: float
    #: Strong fraction needed for 95% of the strong tier's quality (1.0: never reached).
    fraction95: float
    #: Joules needed for it, as a share of always-strong joules (None: no joules labelled).
    joules95: float | None
    #: Least (quality - random quality at the same joules) over the curve (None: no joules).
    margin: float | None
    curve: tuple[list[float], list[float]] = field(default=([], []), repr=False)
    #: At a threshold fixed on the training sources (:func:`fixed_threshold`; the cascade's
    #: rows: at a capacity share fixed there, :func:`fixed_share`): the score threshold, the
    #: quality reached as a share of always-strong quality, and the joules (share of
    #: always-strong; strong share without joules; the cascade's rows: always the strong
    #: share, as their joules include the probe's). None where not computed.
    fixed: tuple[float, float, float] | None = None
    #: How often a random order of the same prompts scores at least this APGR
    #: (:func:`gateway.routing.chance.chance`; None: the tiers never differ on them).
    p: float | None = None
    null: Chance | None = field(default=None, repr=False)


def fixed_threshold(est: DifficultyEstimator, examples: Sequence[Example],
                    rows: Sequence[int], per_source: int = 1500) -> float:
    """The score threshold for 95% of strong quality, fixed on *training* prompts: on each
    training source (at most ``per_source`` evenly spaced prompts, as labelled), the score at
    which the sweep first reaches 95% of that source's strong quality; the mean over sources.
    Nothing of the held-out source takes part."""
    import numpy as np

    by: dict[str, list[int]] = {}
    for r in rows:
        by.setdefault(examples[r].source, []).append(r)
    thresholds = []
    for source_rows in by.values():
        if len(source_rows) > per_source:
            step = len(source_rows) / per_source
            source_rows = [source_rows[int(i * step)] for i in range(per_source)]
        subset = [examples[r] for r in source_rows]
        scores = [est.score_text(t).score for t in _requests(subset, "native")]
        share = cell("", "native", est.name, scores, subset, tested=False).fraction95
        thresholds.append(float(np.quantile(scores, 1.0 - share)) if share > 0 else 1.01)
    return sum(thresholds) / len(thresholds)


def fixed_share(examples: Sequence[Example], scores: Sequence[float]) -> float:
    """The share of requests a cascade's capacity on the strong tier (``threshold: 1``) is
    given, fixed on *training* prompts: the strong share at which each training source's
    sweep of ``scores`` first reaches 95% of its strong quality, averaged over the sources
    with at least MIN_PROMPTS (1.0: none)."""
    shares = [cell("", "native", "", [scores[i] for i in rows], [examples[i] for i in rows],
                   priced=False, tested=False).fraction95
              for rows in by_source(examples).values() if len(rows) >= MIN_PROMPTS]
    return sum(shares) / len(shares) if shares else 1.0


def at_share(share: float, scores: Sequence[float], examples: Sequence[Example]
             ) -> tuple[float, float, float]:
    """:func:`at_threshold` (unpriced) at the score above which ``share`` of these scores lie:
    what a capacity of that fraction does to this traffic."""
    import numpy as np

    cut = float(np.quantile(scores, 1.0 - share)) if share < 1 else -math.inf
    return at_threshold(cut, scores, examples, priced=False)


def has_joules(examples: Sequence[Example]) -> bool:
    """Whether every example has both tiers' joules labelled."""
    return all(e.weak_joules is not None and e.strong_joules is not None for e in examples)


def at_threshold(threshold: float, scores: Sequence[float], examples: Sequence[Example],
                 priced: bool = True) -> tuple[float, float, float]:
    """(threshold, quality as a share of always-strong quality, joules as a share of
    always-strong joules, or the strong share without joules or ``priced``) when every prompt
    scoring at least ``threshold`` goes strong."""
    return (threshold, *_routed([s >= threshold for s in scores], examples, priced))


def _routed(up: Sequence[bool], examples: Sequence[Example], priced: bool = True
            ) -> tuple[float, float]:
    """Quality (share of always-strong quality) and cost (share of always-strong joules; the
    strong share without joules or ``priced``) when the prompts ``up`` go strong."""
    quality = sum(e.strong if u else e.weak for u, e in zip(up, examples, strict=True))
    strong_quality = sum(e.strong for e in examples) or 1
    if priced and has_joules(examples):
        joules = sum((e.strong_joules if u else e.weak_joules) or 0.0
                     for u, e in zip(up, examples, strict=True))
        cost = joules / sum(e.strong_joules or 0.0 for e in examples)
    else:
        cost = sum(up) / len(up)
    return quality / strong_quality, cost


def threshold_95(scores: Sequence[float], examples: Sequence[Example]) -> float | None:
    """The highest score threshold at which sending every prompt scoring at least it to the
    strong tier keeps :data:`QUALITY_SHARE` of always-strong's quality on these prompts;
    ``None`` when the cheap tier alone keeps it. (Prompts tied with the last one needed go
    strong with it: the threshold is their score.)"""
    fractions, quality, _ = cost_curve(scores, examples)  # at the ends of tied blocks
    target = QUALITY_SHARE * sum(e.strong for e in examples) / len(examples)
    reached = next(i for i, q in enumerate(quality) if q >= target - 1e-12)
    if reached == 0:
        return None
    return sorted(scores, reverse=True)[round(fractions[reached] * len(scores)) - 1]


def calibrate(scores: Sequence[float], examples: Sequence[Example], priced: bool = True
              ) -> dict[str, Any]:
    """A threshold for this traffic, and how well such a threshold carries over to traffic it
    was not chosen on: :func:`threshold_95` of all the prompts, with the quality and cost it
    gives them; and chosen on alternate halves (even rows, odd rows), each half routed by the
    other's threshold: the quality and cost of those held-out decisions (the cost in joules
    where the file has them and ``priced``, else the strong share). ``None`` where there is
    nothing to measure: no prompt the strong tier got right, or a half with no rows."""
    out: dict[str, Any] = {"threshold": None, "quality": None, "cost": None,
                           "halves_quality": None, "halves_cost": None,
                           "cost_of": "joules" if priced and has_joules(examples)
                           else "strong share"}
    if not any(e.strong for e in examples):
        return out  # no quality of the strong tier's to keep a share of
    t = threshold_95(scores, examples)
    out["threshold"] = t
    out["quality"], out["cost"] = _routed([t is not None and s >= t for s in scores],
                                          examples, priced)
    halves = [list(range(0, len(scores), 2)), list(range(1, len(scores), 2))]
    if all(halves):
        up = [False] * len(scores)
        for chosen_on, applied_to in (halves, halves[::-1]):
            ht = threshold_95([scores[i] for i in chosen_on], [examples[i] for i in chosen_on])
            for i in applied_to:
                up[i] = ht is not None and scores[i] >= ht
        out["halves_quality"], out["halves_cost"] = _routed(up, examples, priced)
    return out


def cost_curve(scores: Sequence[float], examples: Sequence[Example]
               ) -> tuple[list[float], list[float], list[float]]:
    """Strong fraction, quality and joules (share of always-strong joules; the strong
    fraction when the source has no joules) as the highest scores go strong first; tied
    scores are one block (the straight line across it is the expected curve)."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="stable")
    n = len(s)
    weak = np.array([examples[i].weak for i in order], dtype=float)
    strong = np.array([examples[i].strong for i in order], dtype=float)
    priced = has_joules(examples)
    wj = np.array([examples[i].weak_joules or 0.0 for i in order]) if priced else np.zeros(n)
    sj = np.array([examples[i].strong_joules or 0.0 for i in order]) if priced else np.ones(n)
    ends = [0] + [i for i in range(1, n) if s[order][i] != s[order][i - 1]] + [n]
    quality = (weak.sum() + np.concatenate([[0.0], np.cumsum(strong - weak)])[ends]) / n
    joules = (wj.sum() + np.concatenate([[0.0], np.cumsum(sj - wj)])[ends]) / sj.sum()
    return (np.array(ends, dtype=float) / n).tolist(), quality.tolist(), joules.tolist()


def _first_reaching(xs: list[float], ys: list[float], target: float) -> float:
    """Smallest x (interpolated) at which the curve reaches ``target``; 1.0 if never."""
    if ys[0] >= target:
        return xs[0]
    for i in range(1, len(xs)):
        if ys[i] >= target:
            lo, hi = ys[i - 1], ys[i]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (target - lo) / (hi - lo) if hi > lo else xs[i]
    return 1.0


def answer_confidence(example: Example) -> float | None:
    """How sure the prompt's cheap answer began: the :func:`confidence` of the default probe
    (:data:`CASCADE_PROBE`) over its recorded log-probabilities (None: not recorded)."""
    if not example.cheap_logprobs:
        return None
    tokens, statistic = CASCADE_PROBE
    return confidence(list(example.cheap_logprobs[:tokens]), statistic)


def text_confidence(example: Example) -> float | None:
    """How likely the cheap tier found the prompt's text: exp(its mean log-probability), the
    cascade's ``signal: prompt`` (its default ``mean`` statistic); None: not scored."""
    return None if example.prompt_logprob is None else math.exp(example.prompt_logprob)


#: Each cascade row alone → the confidence it ranks a labelled prompt by.
SIGNALS: dict[str, Callable[[Example], float | None]] = {
    "cascade": answer_confidence, CASCADE_PROMPT: text_confidence}


def _unsure(signal: Callable[[Example], float | None], examples: Sequence[Example]
            ) -> list[float]:
    """1 - each example's confidence by ``signal`` (0 where it has none)."""
    return [1.0 - (1.0 if (c := signal(e)) is None else c) for e in examples]


def cascade_scores(examples: Sequence[Example]) -> list[float]:
    """How unsure each prompt's cheap answer began (1 - :func:`answer_confidence`)."""
    return _unsure(answer_confidence, examples)


def prompt_scores(examples: Sequence[Example]) -> list[float]:
    """How unfamiliar each prompt's text was to the cheap tier (1 - :func:`text_confidence`)."""
    return _unsure(text_confidence, examples)


def prior_weight(examples: Sequence[Example], sure: Sequence[float], prior: Sequence[float],
                 weights: Sequence[float] = PRIOR_WEIGHTS) -> float:
    """The ``routing.cascade.prior_weight`` of ``weights`` under which the cascade's
    confidences ``sure``, lowered by the prior's scores (:func:`with_prior`), rank
    ``examples`` best: the highest worst-source APGR over their sources (those with at least
    MIN_PROMPTS, and whose APGR the weight moves by :data:`PRIOR_MIN_SPREAD` or more), then
    the highest mean; the smallest such weight. With no source of MIN_PROMPTS, the policy's
    default."""
    groups = [g for g in by_source(examples).values() if len(g) >= MIN_PROMPTS]
    if not groups:
        return CascadeSpec().prior_weight

    def apgrs(weight: float) -> list[float]:
        scores = [1.0 - with_prior(c, d, weight) for c, d in zip(sure, prior, strict=True)]
        return [apgr_of([scores[i] for i in g], [examples[i] for i in g]) for g in groups]

    table = {w: apgrs(w) for w in weights}
    # With no source moved, every weight ties: the smallest is taken.
    moved = [k for k in range(len(groups))
             if max(t[k] for t in table.values()) - min(t[k] for t in table.values())
             >= PRIOR_MIN_SPREAD]

    def quality(weight: float) -> tuple[float, float]:
        kept = [table[weight][k] for k in moved] or [0.0]
        return min(kept), sum(kept) / len(kept)

    return max(weights, key=quality)


def apgr_of(scores: Sequence[float], examples: Sequence[Example], name: str = "") -> float:
    """APGR of routing ``examples`` hardest-score-first (0.5 when the tiers never differ)."""
    weak = [e.weak for e in examples]
    strong = [e.strong for e in examples]
    return routing_curve(name, scores, weak, strong).apgr if sum(weak) != sum(strong) else 0.5


def cell(source: str, wording: str, estimator: str, scores: Sequence[float],
         examples: Sequence[Example], priced: bool = True, tested: bool = True) -> Cell:
    """``priced``: the one-shot joules of :func:`cost_curve` are this router's (not for a
    cascade, which also pays its probe): else no joules, margin or curve are given.
    ``tested``: the APGR's p-value against random orders of the same prompts
    (:func:`gateway.routing.chance.chance`, with this estimator's ties) is given."""
    strong = [e.strong for e in examples]
    apgr = apgr_of(scores, examples, estimator)
    null = chance([e.gain for e in examples], scores) if tested else None
    p = None if null is None else null.p(apgr)
    fractions, quality, joules = cost_curve(scores, examples)
    target = QUALITY_SHARE * sum(strong) / len(strong)
    if not priced:
        return Cell(source, wording, estimator, apgr, _first_reaching(fractions, quality, target),
                    None, None, p=p, null=null)
    labelled = has_joules(examples)
    margin = None
    if labelled:  # the curve's inner points against random routing at equal joules
        margin = against_random(zip(joules[1:-1], quality[1:-1], strict=True),
                                (joules[0], quality[0]), (joules[-1], quality[-1]))[0]
    return Cell(source, wording, estimator, apgr, _first_reaching(fractions, quality, target),
                _first_reaching(joules, quality, target) if labelled else None, margin,
                (joules, quality), p=p, null=null)


def _requests(examples: Sequence[Example], wording: str) -> list[RequestText]:
    """``native``: as each prompt was labelled."""
    return [RequestText.of(request_for(e, None if wording == "native" else wording))
            for e in examples]


def _fit_learned(examples: list[Example], rows: list[int]) -> LearnedEstimator:
    """``learned`` as ``router train`` fits it (degree and penalty chosen across the training
    prompts' subjects), on ``rows`` only."""
    features = [extract(RequestText.of(request_for(examples[r]))) for r in rows]
    subset = [examples[r] for r in rows]
    degree, alpha = select(_designs(features), subset, range(len(subset)))
    return LearnedEstimator(fit_artefact(features, subset, degree, alpha))


def evaluate(data_dir: Path, wordings: Sequence[str] = FORMATS,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The leave-one-dataset-out report: ``cells`` (list of :class:`Cell`), ``sources``
    (name → prompts, weak and strong quality), ``chosen`` (held-out source → the semantic
    head and blend chosen without it), ``prior_weights`` (held-out source → cascade row →
    the prior weight chosen without it)."""
    from .estimators import HeuristicEstimator

    sources = load_sources(data_dir)
    skipped = {name: len(rows) for name, rows in sources.items() if len(rows) < MIN_PROMPTS}
    for name, count in skipped.items():
        del sources[name]
        progress(f"skipping source {name}: {count} labelled prompts (fewer than {MIN_PROMPTS})")
    if len(sources) < 2:
        raise ValueError(f"leave-one-dataset-out needs at least two labelled sources under "
                         f"{data_dir}; found {', '.join(sources) or 'none'}")
    examples = [e for rows in sources.values() for e in rows]
    embedder = Embedder.load(semantic_train.DIMS)
    progress(f"embedding {len(examples)} labelled prompts from {len(sources)} sources ...")
    inputs = semantic_train.prepare(examples, embedder)
    cells: list[Cell] = []
    chosen: dict[str, str] = {}
    heuristic = HeuristicEstimator()
    # The cascade's prior: the heuristic's score of each prompt as labelled (nothing fitted).
    prior = [heuristic.score_text(t).score for t in _requests(examples, "native")]
    weights: dict[str, dict[str, float]] = {}
    for held_out in sources:
        train_rows, test_rows = split(examples, held_out)
        progress(f"held out {held_out}: fitting learned and semantic on "
                 f"{len(train_rows)} prompts of {', '.join(s for s in sources if s != held_out)}")
        learned = _fit_learned(examples, train_rows)
        model, _ = semantic_train.fit(inputs, examples, train_rows, embedder=embedder)
        semantic = SemanticEstimator(model)
        chosen[held_out] = describe(model)
        test = [examples[r] for r in test_rows]
        estimators: list[DifficultyEstimator] = [heuristic, learned, semantic]
        for label, (head, blend) in VARIANTS.items():
            variant = SemanticEstimator(semantic_train.fit(inputs, examples, train_rows, head,
                                                           blend, embedder)[0])
            variant.name = label
            estimators.append(variant)
        thresholds = {est.name: fixed_threshold(est, examples, train_rows)
                      for est in estimators[:3]}
        for wording in ("native", *wordings):
            texts = _requests(test, wording)
            for est in estimators:
                scores = [est.score_text(t).score for t in texts]
                whole = cell(held_out, wording, est.name, scores, test)
                cells.append(whole)
                if wording == "native":
                    files = _per_file(held_out, est.name, scores, test)
                    cells.extend(files)
                    if est.name in thresholds:
                        whole.fixed = at_threshold(thresholds[est.name], scores, test)
                        for c in files:
                            c.fixed = at_threshold(thresholds[est.name],
                                                   *_in_file(c, scores, test))
            progress(f"  {held_out} / {wording}: " + ", ".join(
                f"{c.estimator} {c.apgr:.3f}" for c in cells
                if c.source == held_out and c.wording == wording))
        for name, signal in SIGNALS.items():
            sure = {r: conf for r in (*train_rows, *test_rows)
                    if (conf := signal(examples[r])) is not None}
            kept = [r for r in test_rows if r in sure]
            if len(kept) < MIN_PROMPTS:
                continue
            trained = [r for r in train_rows if r in sure]
            weight = weights.setdefault(held_out, {})[name] = prior_weight(
                [examples[r] for r in trained], [sure[r] for r in trained],
                [prior[r] for r in trained])
            scored = [examples[r] for r in kept]
            training = [examples[r] for r in trained]
            for label, w in ((name, 0.0), (f"{name}+{PRIOR}", weight)):
                unsure = [1.0 - with_prior(sure[r], prior[r], w) for r in kept]
                share = fixed_share(training, [1.0 - with_prior(sure[r], prior[r], w)
                                               for r in trained])
                whole = cell(held_out, "native", label, unsure, scored, priced=False)
                files = _per_file(held_out, label, unsure, scored, priced=False)
                # A capacity window escalates the least sure `share` of the traffic it sees:
                # the held-out source's, or one file's (one wording: one tenant's traffic).
                whole.fixed = at_share(share, unsure, scored)
                for c in files:
                    c.fixed = at_share(share, *_in_file(c, unsure, scored))
                cells.extend([whole, *files])
            if name == CASCADE_PROMPT:
                cells.extend(worded_prompt_cells(held_out, test, heuristic, weight, wordings))
        for name, baseline in (("random", [0.0] * len(test)),
                               ("oracle", [e.gain for e in test])):
            cells.append(cell(held_out, "native", name, baseline, test))
            cells.extend(_per_file(held_out, name, baseline, test))
    for source, rows in sources.items():
        if len(rows) >= SEEN_MIN and all(e.strong_joules is not None for e in rows):
            cells.extend(seen_source(source, examples, inputs, embedder, progress))
    info = {name: {"prompts": len(rows), "weak": sum(e.weak for e in rows) / len(rows),
                   "strong": sum(e.strong for e in rows) / len(rows),
                   "joules": all(e.strong_joules is not None for e in rows),
                   "chance": None if (null := chance([e.gain for e in rows])) is None
                   else null.band}
            for name, rows in sources.items()}
    return {"cells": cells, "sources": info, "chosen": chosen, "skipped": skipped,
            "prior_weights": weights}


#: Marks the cells of a held-out source's sample (``mmlu/sample``): the prompts scored in
#: every wording, when those are not all of the source's.
SAMPLE = "/sample"


def worded_prompt_cells(source: str, test: Sequence[Example], prior: DifficultyEstimator,
                        weight: float, wordings: Sequence[str]) -> list[Cell]:
    """The prompt signal's cells (alone, and with ``prior`` at the ``weight`` chosen on the
    training sources) in each of ``wordings`` in which at least MIN_PROMPTS of the held-out
    prompts were scored as asked so (``benchmarks/prompt_scores.py --wordings``), all on the
    prompts scored in every one of them, so that the wordings compare like with like; the
    labels stay those of the labelled wording, as for every estimator. When those prompts are
    a sample of the source (MMLU's), the cells are the source's :data:`SAMPLE`, with a
    ``native`` cell of their own: one source's APGR moves by several hundredths between
    samples."""
    ready = [w for w in wordings
             if sum(e.prompt_logprob_in(w) is not None for e in test) >= MIN_PROMPTS]
    common = [e for e in test
              if all(e.prompt_logprob_in(w) is not None for w in ("native", *ready))]
    if not ready or len(common) < MIN_PROMPTS:
        return []
    name, asked = (source, ready) if len(common) == len(test) else (source + SAMPLE,
                                                                     ["native", *ready])
    out: list[Cell] = []
    for wording in asked:
        sure = [math.exp(cast(float, e.prompt_logprob_in(wording))) for e in common]
        difficulty = [prior.score_text(t).score for t in _requests(common, wording)]
        for label, w in ((CASCADE_PROMPT, 0.0), (f"{CASCADE_PROMPT}+{PRIOR}", weight)):
            unsure = [1.0 - with_prior(c, d, w) for c, d in zip(sure, difficulty, strict=True)]
            out.append(cell(name, wording, label, unsure, common, priced=False))
    return out


def compares_wordings(source: str) -> bool:
    """Whether a source's cells compare wordings: a held-out source or its sample."""
    return "/" not in source or source.endswith(SAMPLE)


def seen_source(source: str, examples: list[Example], inputs: semantic_train.Inputs,
                embedder: Embedder, progress: Callable[[str], None]) -> list[Cell]:
    """A source of our own tiers' labels with its *problems* held out instead: its prompts
    dealt into :data:`SEEN_FOLDS` folds (a problem's wordings together), each scored by
    models fitted on every other source and the other folds; reported as ``<source>+cv``.
    This is what the shipped models, which do train on the source, can be expected to do on
    new problems of the same kind."""
    from .estimators import HeuristicEstimator
    from .labels import normalise

    rows = [i for i, e in enumerate(examples) if e.source == source]
    keys = sorted({normalise(examples[r].prompt) for r in rows})
    folds = [set(keys[k::SEEN_FOLDS]) for k in range(SEEN_FOLDS)]
    scores: dict[str, dict[int, float]] = {"heuristic": {}, "learned": {}, "semantic": {}}
    heuristic = HeuristicEstimator()
    for k, fold in enumerate(folds):
        test_rows = [r for r in rows if normalise(examples[r].prompt) in fold]
        train_rows = [i for i, e in enumerate(examples) if normalise(e.prompt) not in fold]
        progress(f"{source}, problems held out (fold {k + 1}/{SEEN_FOLDS}): fitting on "
                 f"{len(train_rows)} prompts")
        learned = _fit_learned(examples, train_rows)
        semantic = SemanticEstimator(semantic_train.fit(inputs, examples, train_rows,
                                                        embedder=embedder)[0])
        texts = _requests([examples[r] for r in test_rows], "native")
        for est in (heuristic, learned, semantic):
            for r, t in zip(test_rows, texts, strict=True):
                scores[est.name][r] = est.score_text(t).score
    test = [examples[r] for r in rows]
    label = f"{source}+cv"
    out: list[Cell] = []
    for name, by_row in [*scores.items(), ("random", dict.fromkeys(rows, 0.0)),
                         ("oracle", {r: examples[r].gain for r in rows})]:
        ordered = [by_row[r] for r in rows]
        out.append(cell(label, "native", name, ordered, test))
        out.extend(_per_file(label, name, ordered, test))
    return out


def _per_file(source: str, name: str, scores: Sequence[float], test: Sequence[Example],
              priced: bool = True) -> list[Cell]:
    """A source's files one by one (``humaneval/chat``), when it has several and they are
    not MMLU subjects: the same problems labelled in different wordings."""
    files = sorted({e.subject for e in test})
    if source.startswith("mmlu") or len(files) < 2:
        return []
    return [cell(f"{source}/{f}", "native", name, [s for s, e in zip(scores, test, strict=True)
                                                   if e.subject == f],
                 [e for e in test if e.subject == f], priced) for f in files]


def _in_file(c: Cell, scores: Sequence[float], examples: Sequence[Example]
             ) -> tuple[list[float], list[Example]]:
    """The scores and examples of the file a :func:`_per_file` cell is about."""
    subject = c.source.split("/", 1)[1]
    pairs = [(x, e) for x, e in zip(scores, examples, strict=True) if e.subject == subject]
    return [x for x, _ in pairs], [e for _, e in pairs]


def describe(model: Any) -> str:
    """The semantic model's head and blend in words."""
    head = f"kNN k={model.k}" if model.head == "knn" else f"linear L2={model.meta['l2']:g}"
    return head + ", weights " + ", ".join(f"{k} {v:g}" for k, v in model.blend.items())


def split(examples: Sequence[Example], held_out: str) -> tuple[list[int], list[int]]:
    """(training rows, test rows): the test rows are exactly the held-out source's, and no
    training row carries one of their prompts (sources may share prompts: ``mmlu_local``
    asks RouteLLM's MMLU prompts of our own tiers)."""
    from .labels import normalise

    test = [i for i, e in enumerate(examples) if e.source == held_out]
    prompts = {normalise(examples[i].prompt) for i in test}
    train = [i for i, e in enumerate(examples)
             if e.source != held_out and normalise(e.prompt) not in prompts]
    return train, test


def summary(cells: list[Cell]) -> dict[str, dict[str, float]]:
    """Per estimator: mean and worst held-out APGR in the labelled wording (``native``), the
    worst over every wording, the widest spread (max - min APGR over wordings) of any
    source, over how many held-out sources (``cascade``: those with the cheap tier's
    log-probabilities), on how many of them the APGR is better than chance (a random
    order of the source's prompts scores as high less than :data:`.chance.LEVEL` of the
    time), and how often random routing on every one of them scores the mean as high
    (``mean_p``; NaN when a source has no null)."""
    out: dict[str, dict[str, float]] = {}
    for name in (*ESTIMATOR_NAMES, *CASCADES, *VARIANTS):
        mine = [c for c in cells if c.estimator == name]
        if not mine:
            continue
        mine = [c for c in mine if "+cv" not in c.source]
        held = [c for c in mine if c.wording == "native" and "/" not in c.source]
        native = [c.apgr for c in held]
        spreads = []
        for source in sorted({c.source for c in mine if compares_wordings(c.source)}):
            values = [c.apgr for c in mine if c.source == source]
            spreads.append(max(values) - min(values))
        nulls = [c.null for c in held if c.null is not None]
        out[name] = {"mean": sum(native) / len(native), "worst": min(native),
                     "worst_any_wording": min(c.apgr for c in mine if compares_wordings(c.source)),
                     "widest_spread": max(spreads), "sources": len(native),
                     "above_chance": sum(c.p is not None and c.p < LEVEL for c in held),
                     "mean_p": mean_p(native, nulls) if len(nulls) == len(held) else math.nan}
    return out


# -- anyone's labelled set -----------------------------------------------------------------

def score_label_file(path: Path, names: Sequence[str] | None = None
                     ) -> tuple[list[Example], dict[str, dict[str, Any]]]:
    """Every shipped estimator (or ``names``), as trained in the package, on the CSV's
    prompts asked as plain user messages (or the CSV's ``format`` column): per estimator
    ``apgr``, ``scores`` in file order and the file's own threshold (:func:`calibrate`), or
    ``error`` when it cannot load here."""
    examples = read_label_file(path)
    if not examples:
        raise ValueError(f"{path}: no labelled rows")
    out: dict[str, dict[str, Any]] = {}
    requests: list[GenerationRequest] = [request_for(e) for e in examples]
    # ``cascade`` decides after the cheap tier's first tokens, not from the prompt: it ranks
    # by them where the file recorded them (cheap_answer_logprobs or cheap_logprobs).
    probed = all(e.cheap_logprobs for e in examples)
    for name in names or [n for n in sorted(ESTIMATORS) if n != "cascade" or probed]:
        if name == "cascade":
            if not probed:
                out[name] = {"error": "the cascade ranks by the cheap tier's answer's "
                             "log-probabilities: give a cheap_logprobs column on every row"}
                continue
            scores = cascade_scores(examples)
            c = cell(path.stem, "file", name, scores, examples, priced=False)
            out[name] = {"apgr": c.apgr, "p": c.p, "fraction95": c.fraction95,
                         "joules95": None, "scores": scores,
                         "calibration": calibrate(scores, examples, False)}
            continue
        try:
            est = ESTIMATORS[name]()
        except (SemanticUnavailable, ValueError, OSError) as exc:
            out[name] = {"error": str(exc)}
            continue
        scores = [est.score(r).score for r in requests]
        c = cell(path.stem, "file", name, scores, examples)
        out[name] = {"apgr": c.apgr, "p": c.p, "fraction95": c.fraction95,
                     "joules95": c.joules95, "scores": scores,
                     "calibration": calibrate(scores, examples)}
    return examples, out
