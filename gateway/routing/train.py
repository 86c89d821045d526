"""Train the ``learned`` estimator and benchmark routers on labelled routing data.

``joulegate router train`` and ``joulegate router eval`` call :func:`train` and
:func:`evaluate`. Both read ``data/routing/mmlu/*.csv`` (per-prompt correctness of a weak
and a strong model) and need NumPy (``pip install 'joulegate[bench]'``); the plot needs
matplotlib. Training is deterministic (Newton's method to convergence on a convex
objective, no random draws), so the same data gives the same artefact byte for byte.

The label benchmark follows RouteLLM's metrics: sweep the fraction of prompts sent to the
strong model; quality is the mean correctness of the model each prompt was sent to;
PGR = (quality - weak) / (strong - weak); APGR is the area under PGR; CPT(p) the smallest
strong fraction reaching PGR p. Routers are evaluated on subjects they were not trained
on: subjects are dealt into folds, and each prompt is scored by a model fitted on the
other folds. Ties in a router's scores are resolved in expectation (linear interpolation
across a tied block), so a constant score *is* random routing.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends import GenerationRequest

from .estimators import (
    MODEL_FILE,
    Artefact,
    HeuristicEstimator,
    LearnedEstimator,
    interaction_pairs,
)
from .features import RequestText, extract
from .labels import Example

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike, NDArray

    #: A vector or matrix of floats.
    Floats = NDArray[np.float64]
    #: A fitted ridge model: (column means, column scales, weights).
    Ridge = tuple[Floats, Floats, Floats]

WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_COLUMN = "gpt-4-1106-preview"
FOLDS = 4
#: (degree, L2 penalty on standardised weights) tried by cross-validation across subjects.
GRID = [(degree, alpha) for degree in (1, 2)
        for alpha in (10.0, 100.0, 1e3, 3e3, 1e4, 3e4, 1e5)]


def default_data_dir() -> Path:
    """``$JOULEGATE_ROUTING_DATA``, else the checkout's ``data/routing``.

    The data ships with the source tree, not with the wheel: an installed package has no
    default and says to pass ``--data``."""
    env = os.environ.get("JOULEGATE_ROUTING_DATA")
    if env:
        return Path(env)
    data = Path(__file__).resolve().parents[2] / "data" / "routing"
    if not data.is_dir():
        raise FileNotFoundError(
            f"no routing data at {data}: it ships with the joulegate source tree "
            "(data/routing), not with the installed package; pass --data DIR (a folder "
            "holding mmlu/mmlu_*.csv) or set JOULEGATE_ROUTING_DATA")
    return data


def _normalise(text: str) -> str:
    return " ".join(text.split())


def load_mmlu(data_dir: Path) -> tuple[list[Example], set[str]]:
    """All labelled prompts, and the (normalised) prompts to keep out of evaluation."""
    mmlu = Path(data_dir) / "mmlu"
    files = sorted(mmlu.glob("mmlu_*.csv"))
    if not files:
        raise FileNotFoundError(f"no mmlu_*.csv under {mmlu}; pass --data DIR (data/routing)")
    examples: list[Example] = []
    for path in files:
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                examples.append(Example(subject, row["prompt"], row[WEAK_COLUMN] == "True",
                                        row[STRONG_COLUMN] == "True"))
    contaminated: set[str] = set()
    listing = mmlu / "contaminated_prompts.jsonl"
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                contaminated.update(_normalise(item[k]) for k in ("eval_prompt", "train_prompt")
                                    if item.get(k))
    return examples, contaminated


def as_text(prompt: str) -> RequestText:
    return RequestText.of(GenerationRequest(model="", messages=[{"role": "user", "content": prompt}]))


# -- fitting -----------------------------------------------------------------------------

def _design(features: list[dict[str, float]], names: list[str], degree: int) -> Floats:
    """Rows of base features, then (degree 2) their pairwise products, as the estimator
    builds them (:func:`interaction_pairs`, same order)."""
    import numpy as np

    x = np.array([[f[n] for n in names] for f in features], dtype=float)
    if degree == 2:
        i, j = np.array(interaction_pairs(len(names))).T
        x = np.hstack([x, x[:, i] * x[:, j]])
    return x


def _designs(features: list[dict[str, float]]) -> dict[int, Floats]:
    """Every degree's design matrix that :data:`GRID` tries (degree → matrix)."""
    names = sorted(features[0])
    return {degree: _design(features, names, degree) for degree in sorted({d for d, _ in GRID})}


def _fit_ridge(x: Floats, y: Floats, alpha: float) -> Ridge:
    """Ridge regression on standardised columns; returns (mean, scale, weights).

    Predictions are centred: the model predicts a prompt's gain *relative to the training
    prompts' mean*, with no intercept. The score is a quantile, so an intercept would not
    change the shipped router's order; but in cross-validation it would shift each held-out
    fold by its training folds' mean gain, which runs opposite to the held-out fold's own
    (leave out the mathematical subjects and the rest look easier) and so scrambles the pooled
    ranking that both model selection and the benchmark's APGR are computed on."""
    import numpy as np

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return mean, scale, weights


def _predict(model: Ridge, x: Floats) -> Floats:
    mean, scale, weights = model
    return ((x - mean) / scale) @ weights


def _gain(examples: list[Example]) -> Floats:
    import numpy as np

    return np.array([e.gain for e in examples])


def select(designs: dict[int, Floats], examples: list[Example], indices: Sequence[int],
           folds: int = 3) -> tuple[int, float]:
    """The (degree, alpha) of :data:`GRID` with the best APGR when each of ``folds`` groups
    of the ``indices``' subjects is predicted by a model fitted on the others."""
    import numpy as np

    rows = np.asarray(indices)
    gain = _gain(examples)
    subjects = np.array([e.subject for e in examples])
    groups = subject_folds(list(subjects[rows]), folds)
    weak = [examples[i].weak for i in rows]
    strong = [examples[i].strong for i in rows]
    best: tuple[float, int, float] | None = None
    for degree, alpha in GRID:
        x = designs[degree]
        scores = np.zeros(len(examples))
        for group in groups:
            held = rows[np.isin(subjects[rows], group)]
            fit = rows[~np.isin(subjects[rows], group)]
            scores[held] = _predict(_fit_ridge(x[fit], gain[fit], alpha), x[held])
        apgr = routing_curve("", scores[rows], weak, strong).apgr
        if best is None or apgr > best[0]:
            best = (apgr, degree, alpha)
    assert best is not None
    return best[1], best[2]


def fit_artefact(features: list[dict[str, float]], examples: list[Example],
                 degree: int, alpha: float) -> Artefact:
    """The ``learned`` estimator's artefact, fitted on these examples."""
    import numpy as np

    names = sorted(features[0])
    x = _design(features, names, degree)
    mean, scale, weights = _fit_ridge(x, _gain(examples), alpha)
    artefact: Artefact = {"features": names, "degree": degree,
                "mean": [round(float(m), 8) for m in mean],
                "scale": [round(float(s), 8) for s in scale],
                "weights": [round(float(w), 8) for w in weights], "quantiles": []}
    estimator = LearnedEstimator(artefact)
    predictions = np.array([estimator.predict(f) for f in features])
    artefact["quantiles"] = [round(float(q), 8) for q in np.quantile(predictions,
                                                                      np.linspace(0, 1, 101))]
    return artefact


def train(data_dir: Path, out: Path = MODEL_FILE) -> Artefact:
    """Choose degree and penalty across subjects, fit on every labelled prompt except the
    contaminated ones, and write the artefact."""
    examples, contaminated = load_mmlu(data_dir)
    examples = [e for e in examples if _normalise(e.prompt) not in contaminated]
    features = [extract(as_text(e.prompt)) for e in examples]
    degree, alpha = select(_designs(features), examples, range(len(examples)), FOLDS)
    artefact = fit_artefact(features, examples, degree, alpha)
    artefact["meta"] = {
        "data": "routing-data/mmlu (RouteLLM responses; weak: Mixtral-8x7B, strong: GPT-4)",
        "examples": len(examples), "degree": degree, "l2": alpha,
        "selected_by": f"APGR, {FOLDS}-fold cross-validation across subjects",
        "target": "strong right - weak right (expected gain of the strong model), "
                  "relative to the training prompts' mean",
        "score": "quantile of the predicted gain among the training prompts",
    }
    Path(out).write_text(json.dumps(artefact, indent=1, sort_keys=True) + "\n")
    return artefact


# -- evaluation --------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    name: str
    fractions: list[float]  # strong-model fraction at each point
    quality: list[float]
    apgr: float
    cpt50: float
    cpt80: float


def against_random(points: Iterable[tuple[float, float]], cheap: tuple[float, float],
                   strong: tuple[float, float]) -> tuple[float, int, int]:
    """``(joules, quality)`` points of a router against random routing at equal joules, whose
    expected quality is the straight line from always-cheap's ``(joules, quality)`` to
    always-strong's: the least margin (quality less random's), how many points are below
    random, and how many there are; ``(0.0, 0, 0)`` for none."""
    (j0, q0), (j1, q1) = cheap, strong
    margins = [q - (q1 if j1 == j0 else q0 + (q1 - q0) * (j - j0) / (j1 - j0))
               for j, q in points]
    if not margins:
        return 0.0, 0, 0
    return min(margins), sum(m < -1e-9 for m in margins), len(margins)


def routing_curve(name: str, scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> Curve:
    """Quality vs strong fraction when the highest scores go to the strong model first."""
    import numpy as np

    arrays = [np.asarray(a, dtype=float) for a in (scores, weak, strong)]
    order = np.argsort(-arrays[0], kind="stable")
    s, w, st = (a[order] for a in arrays)
    n = len(s)
    gain = np.concatenate([[0.0], np.cumsum(st - w)])
    # Points only at the ends of tied blocks: inside a block the order is arbitrary, so
    # the expected curve is the straight line across it.
    ends = [0] + [i for i in range(1, n) if s[i] != s[i - 1]] + [n]
    x = np.array(ends, dtype=float) / n
    q = (w.sum() + gain[ends]) / n
    weak_q, strong_q = w.mean(), st.mean()
    pgr = (q - weak_q) / (strong_q - weak_q)
    apgr = float(np.trapezoid(pgr, x))

    def cpt(target: float) -> float:
        for i in range(1, len(x)):
            if pgr[i] >= target:
                lo, hi = pgr[i - 1], pgr[i]
                return float(x[i - 1] + (x[i] - x[i - 1]) * (target - lo) / (hi - lo)) if hi > lo \
                    else float(x[i])
        return 1.0

    return Curve(name, x.tolist(), q.tolist(), apgr, cpt(0.5), cpt(0.8))


def subject_folds(subjects: list[str], folds: int = FOLDS) -> list[list[str]]:
    ordered = sorted(set(subjects))
    return [ordered[k::folds] for k in range(folds)]


def evaluate(data_dir: Path) -> tuple[list[Curve], dict[str, Any]]:
    """Random, length-only, heuristic and learned. ``learned`` is fitted out-of-fold by
    subject, and its degree and penalty are chosen inside each fold's training subjects
    (nested cross-validation), so no held-out prompt informs its own score."""
    import numpy as np

    examples, contaminated = load_mmlu(data_dir)
    designs = _designs([extract(as_text(e.prompt)) for e in examples])
    evaluated = [i for i, e in enumerate(examples) if _normalise(e.prompt) not in contaminated]
    folds = subject_folds([e.subject for e in examples])
    gain = _gain(examples)
    learned = np.zeros(len(examples))
    chosen: list[str] = []
    for held_out in folds:
        train_idx = [i for i in evaluated if examples[i].subject not in held_out]
        test_idx = [i for i in evaluated if examples[i].subject in held_out]
        degree, alpha = select(designs, examples, train_idx)
        chosen.append(f"degree {degree}, L2 {alpha:g}")
        x = designs[degree]
        learned[test_idx] = _predict(_fit_ridge(x[train_idx], gain[train_idx], alpha), x[test_idx])
    heuristic = HeuristicEstimator()
    weak = [examples[i].weak for i in evaluated]
    strong = [examples[i].strong for i in evaluated]
    scores = {
        "random": [0.0] * len(evaluated),
        "length": [float(len(examples[i].prompt)) for i in evaluated],
        "heuristic": [heuristic.score_text(as_text(examples[i].prompt)).score for i in evaluated],
        "learned": [float(learned[i]) for i in evaluated],
    }
    curves = [routing_curve(name, s, weak, strong) for name, s in scores.items()]
    per_fold: list[dict[str, float]] = []  # APGR within each held-out fold: how much the pooled figure varies
    for held_out in folds:
        idx = [k for k, i in enumerate(evaluated) if examples[i].subject in held_out]
        per_fold.append({name: routing_curve(name, [s[k] for k in idx], [weak[k] for k in idx],
                                             [strong[k] for k in idx]).apgr
                         for name, s in scores.items() if name != "random"})
    info = {"prompts": len(evaluated), "excluded_contaminated": len(examples) - len(evaluated),
            "folds": [", ".join(f) for f in folds], "chosen": chosen, "per_fold": per_fold,
            "weak_accuracy": sum(weak) / len(weak), "strong_accuracy": sum(strong) / len(strong)}
    return curves, info


def table(curves: list[Curve]) -> str:
    lines = ["| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c.name} | {c.apgr:.3f} | {c.cpt50:.1%} | {c.cpt80:.1%} |")
    return "\n".join(lines)


def plot(curves: list[Curve], info: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for c in curves:
        ax.plot([100 * f for f in c.fractions], [100 * q for q in c.quality],
                label=f"{c.name} (APGR {c.apgr:.3f})", linewidth=1.6)
    ax.axhline(100 * info["weak_accuracy"], color="grey", linestyle=":", linewidth=1)
    ax.axhline(100 * info["strong_accuracy"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("prompts sent to the strong model (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MMLU, held-out subjects ({info['prompts']} prompts, {FOLDS} subject folds)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

