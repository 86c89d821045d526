"""Train the ``learned`` estimator and benchmark routers on labelled routing data.

``joulegate router train`` and ``joulegate router eval`` call :func:`train` and
:func:`evaluate`. Both read ``routing-data/mmlu/*.csv`` (per-prompt correctness of a weak
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
from dataclasses import dataclass
from pathlib import Path

from backends import GenerationRequest

from .estimators import MODEL_FILE, HeuristicEstimator, LearnedEstimator
from .features import RequestText, extract

WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_COLUMN = "gpt-4-1106-preview"
#: L2 penalty on standardised weights (sum of log-losses + L2/2 * |w|^2).
L2 = 100.0
FOLDS = 4


def default_data_dir() -> Path:
    env = os.environ.get("JOULEGATE_ROUTING_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "routing-data"


@dataclass(frozen=True, slots=True)
class Example:
    subject: str
    prompt: str
    weak: bool
    strong: bool

    @property
    def needs_strong(self) -> bool:
        return self.strong and not self.weak


def _normalise(text: str) -> str:
    return " ".join(text.split())


def load_mmlu(data_dir: Path) -> tuple[list[Example], set[str]]:
    """All labelled prompts, and the (normalised) prompts to keep out of evaluation."""
    mmlu = Path(data_dir) / "mmlu"
    files = sorted(mmlu.glob("mmlu_*.csv"))
    if not files:
        raise FileNotFoundError(f"no mmlu_*.csv under {mmlu}; pass --data DIR (routing-data)")
    examples = []
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

def _fit_logistic(x, y, l2: float = L2, iterations: int = 50):
    """L2-regularised logistic regression by Newton's method; returns (bias, weights)."""
    import numpy as np

    n, d = x.shape
    design = np.hstack([np.ones((n, 1)), x])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[0] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        step *= min(1.0, 2.0 / max(float(np.max(np.abs(step))), 1e-12))  # damped: no overshoot
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), w[1:]


def _matrix(features: list[dict[str, float]], names: list[str]):
    import numpy as np

    return np.array([[f[n] for n in names] for f in features], dtype=float)


def fit_artefact(features: list[dict[str, float]], examples: list[Example]) -> dict:
    """The ``learned`` estimator's artefact, fitted on these examples."""
    import numpy as np

    names = sorted(features[0])
    x = _matrix(features, names)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale
    weak_wrong = np.array([not e.weak for e in examples], dtype=float)
    strong_right = np.array([e.strong for e in examples], dtype=float)
    models = {}
    for key, target in (("weak_wrong", weak_wrong), ("strong_right", strong_right)):
        bias, weights = _fit_logistic(z, target)
        models[key] = {"bias": round(bias, 6), "weights": [round(float(w), 6) for w in weights]}
    artefact = {"features": names, "mean": [round(float(m), 6) for m in mean],
                "scale": [round(float(s), 6) for s in scale], **models, "quantiles": []}
    estimator = LearnedEstimator(artefact)
    probabilities = np.array([estimator.probability(f) for f in features])
    artefact["quantiles"] = [round(float(q), 8) for q in np.quantile(probabilities,
                                                                      np.linspace(0, 1, 101))]
    return artefact


def train(data_dir: Path, out: Path = MODEL_FILE) -> dict:
    """Fit on every labelled prompt except the contaminated ones; write the artefact."""
    examples, contaminated = load_mmlu(data_dir)
    examples = [e for e in examples if _normalise(e.prompt) not in contaminated]
    features = [extract(as_text(e.prompt)) for e in examples]
    artefact = fit_artefact(features, examples)
    artefact["meta"] = {
        "data": "routing-data/mmlu (RouteLLM responses; weak: Mixtral-8x7B, strong: GPT-4)",
        "examples": len(examples), "l2": L2,
        "label": "score = quantile of P(weak wrong) * P(strong right)",
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


def routing_curve(name: str, scores, weak, strong) -> Curve:
    """Quality vs strong fraction when the highest scores go to the strong model first."""
    import numpy as np

    scores, weak, strong = (np.asarray(a, dtype=float) for a in (scores, weak, strong))
    order = np.argsort(-scores, kind="stable")
    s, w, st = scores[order], weak[order], strong[order]
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


def evaluate(data_dir: Path) -> tuple[list[Curve], dict]:
    """Random, length-only, heuristic and learned (fitted out-of-fold by subject)."""
    examples, contaminated = load_mmlu(data_dir)
    features = [extract(as_text(e.prompt)) for e in examples]
    evaluated = [i for i, e in enumerate(examples) if _normalise(e.prompt) not in contaminated]
    folds = subject_folds([e.subject for e in examples])
    learned = [0.0] * len(examples)
    for held_out in folds:
        train_idx = [i for i in evaluated if examples[i].subject not in held_out]
        model = LearnedEstimator(fit_artefact([features[i] for i in train_idx],
                                                            [examples[i] for i in train_idx]))
        for i in evaluated:
            if examples[i].subject in held_out:
                learned[i] = model.probability(features[i])
    heuristic = HeuristicEstimator()
    weak = [examples[i].weak for i in evaluated]
    strong = [examples[i].strong for i in evaluated]
    curves = [
        routing_curve("random", [0.0] * len(evaluated), weak, strong),
        routing_curve("length", [len(examples[i].prompt) for i in evaluated], weak, strong),
        routing_curve("heuristic", [heuristic.score_text(as_text(examples[i].prompt)).score
                                    for i in evaluated], weak, strong),
        routing_curve("learned", [learned[i] for i in evaluated], weak, strong),
    ]
    info = {"prompts": len(evaluated), "excluded_contaminated": len(examples) - len(evaluated),
            "folds": [", ".join(f) for f in folds],
            "weak_accuracy": sum(weak) / len(weak), "strong_accuracy": sum(strong) / len(strong)}
    return curves, info


def table(curves: list[Curve]) -> str:
    lines = ["| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c.name} | {c.apgr:.3f} | {c.cpt50:.1%} | {c.cpt80:.1%} |")
    return "\n".join(lines)


def plot(curves: list[Curve], info: dict, out: Path) -> None:
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

