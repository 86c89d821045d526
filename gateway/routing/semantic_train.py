"""Fitting the ``semantic`` estimator (:mod:`.semantic`) on labelled prompts (NumPy).

:func:`fit` chooses the embedding head (kNN with ``k`` neighbours, or a ridge head) and the
weights of the embedding, shape and prior parts by cross-validation *inside the prompts it
is given* (leaving one source out at a time when there are several, else by MMLU subject or
by problem), scoring each candidate by the mean APGR over the sources of its held-out folds,
then fits the chosen model on all of them. Gains are taken relative to each source's mean
and sources weigh the same. So when the
leave-one-dataset-out benchmark (:mod:`.lodo`) calls it without the held-out source, nothing
of that source informs the choice. :func:`train` fits on every labelled source and writes
the shipped ``semantic_model.npz``. No random draws: the kNN reference prompts are an
evenly spaced subset of each source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .estimators import HeuristicEstimator
from .features import RequestText, extract
from .labels import MIN_PROMPTS, Example, load_sources, normalise, request_for
from .semantic import SEMANTIC_FILE, Embedder, SemanticModel
from .train import routing_curve

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Floats = NDArray[np.float64]
    Ints = NDArray[np.int64]

#: Embedding heads tried: ("knn", k) or ("linear", L2 penalty).
HEADS: list[tuple[str, float]] = [("knn", 16), ("knn", 64), ("linear", 3.0), ("linear", 30.0)]
#: Weights of the (embedding, shape, prior) parts tried: a grid on the simplex, step 1/4.
BLENDS = [(e / 4, s / 4, (4 - e - s) / 4) for e in range(5) for s in range(5 - e)]
PARTS = ("embedding", "shape", "prior")
SHAPE_L2 = 100.0
#: Stored (kNN reference) prompts per source at most: keeps the file to a few MB.
CAP_PER_SOURCE = 4000
DIMS = 128
FOLDS = 4
EXCERPT_CHARS = 160


@dataclass
class Inputs:
    """What fitting needs of each example: embedding, shape features, gain."""

    vectors: Any       # (n, DIMS) float32, unit length
    features: Any      # (n, F) float64
    names: list[str]
    gain: Any          # (n,) strong - weak
    texts: list[str]   # the text embedded (the request's last user turn or prompt)

    @property
    def prior_weights(self) -> Any:
        """The heuristic's weights, aligned to :attr:`names` (0 for features it ignores)."""
        import numpy as np

        weights = HeuristicEstimator.WEIGHTS
        return np.array([weights.get(n, 0.0) for n in self.names])


def prepare(examples: Sequence[Example], embedder: Embedder,
            wording: str | None = None) -> Inputs:
    """Embed and featurise each example as the request ``wording`` makes it (default: the
    format it was labelled in)."""
    import numpy as np

    texts, rows = [], []
    for e in examples:
        text = RequestText.of(request_for(e, wording))
        texts.append(text.last)
        rows.append(extract(text))
    names = sorted(rows[0])
    features = np.array([[r[n] for n in names] for r in rows], dtype=float)
    gain = np.array([e.gain for e in examples])
    return Inputs(embedder.embed_many(texts), features, names, gain, texts)


def _ridge(x: Floats, y: Floats, alpha: float, standardise: bool = True,
           weights: Floats | None = None) -> tuple[Floats, Floats, Floats]:
    """Weighted ridge on (standardised) columns, no intercept after centring; ``weights``
    sum to the row count (default: all 1)."""
    import numpy as np

    wts = np.ones(len(y)) if weights is None else weights
    mean = (wts[:, None] * x).sum(axis=0) / wts.sum()
    scale = (np.sqrt((wts[:, None] * (x - mean) ** 2).sum(axis=0) / wts.sum()) if standardise
             else np.ones(x.shape[1]))
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale
    zw = z * wts[:, None]
    w = np.linalg.solve(zw.T @ z + alpha * np.eye(z.shape[1]),
                        zw.T @ (y - (wts * y).sum() / wts.sum()))
    return mean, scale, w


def targets(inputs: Inputs, examples: Sequence[Example], rows: Sequence[int]
            ) -> tuple[Floats, Floats]:
    """For ``rows``: the gain relative to its own source's mean gain (routing ranks prompts
    within a workload, so what sets one source apart from another is noise to it), and
    weights that give every source the same total (a large source does not drown the
    others)."""
    import numpy as np

    src = np.array([examples[r].source for r in rows])
    gain = inputs.gain[np.asarray(rows)]
    target = np.zeros(len(rows))
    weights = np.zeros(len(rows))
    names = sorted(set(src))
    for name in names:
        mask = src == name
        target[mask] = gain[mask] - gain[mask].mean()
        weights[mask] = len(rows) / (len(names) * mask.sum())
    return target, weights


def reference_rows(examples: Sequence[Example], rows: Sequence[int],
                   cap: int = CAP_PER_SOURCE) -> list[int]:
    """The rows kept as kNN references: every row of a source, or an evenly spaced ``cap``
    of them (deterministic)."""
    by: dict[str, list[int]] = {}
    for r in rows:
        by.setdefault(examples[r].source, []).append(r)
    kept: list[int] = []
    for source_rows in by.values():
        if len(source_rows) > cap:
            step = len(source_rows) / cap
            source_rows = [source_rows[int(i * step)] for i in range(cap)]
        kept.extend(source_rows)
    return sorted(kept)


def _top(query: Any, ref: Any, k: int, exclude_self: Sequence[int] | None = None) -> Ints:
    """Indices into ``ref`` of each query row's ``k`` most similar rows, most similar first
    (chunked). ``exclude_self[i]``: a ``ref`` index query ``i`` may not use (itself)."""
    import numpy as np

    k = min(k, len(ref) - (1 if exclude_self is not None else 0))
    out = np.zeros((len(query), k), dtype=np.int64)
    for start in range(0, len(query), 2048):
        sims = query[start:start + 2048] @ ref.T
        if exclude_self is not None:
            own = np.asarray(exclude_self[start:start + 2048])
            sims[np.arange(len(own)), own] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:start + len(top)] = np.take_along_axis(top, order, axis=1)
    return out


def _parts(inputs: Inputs, examples: Sequence[Example], fit: Sequence[int],
           ref: Sequence[int], query: Ints,
           exclude_self: Sequence[int] | None = None) -> dict[Any, Floats]:
    """Each head's embedding part and the shape part for the query rows."""
    import numpy as np

    fit_a, ref_a = np.asarray(fit), np.asarray(ref)
    target, weights = targets(inputs, examples, fit)
    parts: dict[Any, Floats] = {}
    mean, scale, w = _ridge(inputs.features[fit_a], target, SHAPE_L2, True, weights)
    parts["shape"] = ((inputs.features[query] - mean) / scale) @ w
    parts["prior"] = inputs.features[query] @ inputs.prior_weights
    kmax = int(max(k for h, k in HEADS if h == "knn"))
    top = _top(inputs.vectors[query], inputs.vectors[ref_a], kmax, exclude_self)
    position = {r: i for i, r in enumerate(fit)}
    ref_target = target[[position[r] for r in ref]]
    for head, value in HEADS:
        if head == "knn":
            parts[(head, value)] = ref_target[top[:, : int(value)]].mean(axis=1)
        else:
            m, _, lw = _ridge(inputs.vectors[fit_a].astype(float), target, value, False, weights)
            parts[(head, value)] = (inputs.vectors[query] - m) @ lw
    return parts


def _spread(x: Floats) -> float:
    s = float(x.std())
    return s if s > 1e-9 else 1.0


def _mean_apgr(scores: Floats, examples: Sequence[Example], rows: Sequence[int]) -> float:
    by: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        by.setdefault(examples[r].source, []).append(k)
    values = []
    for ks in by.values():
        weak = [examples[rows[k]].weak for k in ks]
        strong = [examples[rows[k]].strong for k in ks]
        if sum(strong) != sum(weak):
            values.append(routing_curve("", scores[ks], weak, strong).apgr)
    return sum(values) / len(values) if values else 0.0


def groups(examples: Sequence[Example], rows: Sequence[int]) -> list[list[int]]:
    """Cross-validation folds of ``rows``: one per source when there are several (so the
    choice is the one that carried over to a source it was not fitted on); within a single
    source, MMLU subjects or (other sources, whose files may hold the same problems in two
    wordings) prompts, dealt round-robin into :data:`FOLDS`."""
    sources = sorted({examples[r].source for r in rows})
    if len(sources) > 1:
        return [[r for r in rows if examples[r].source == s] for s in sources]

    def key(e: Example) -> str:
        return e.subject if e.source == "mmlu" else normalise(e.prompt)

    keys = sorted({key(examples[r]) for r in rows})
    folds = [set(keys[k::FOLDS]) for k in range(FOLDS)]
    return [[r for r in rows if key(examples[r]) in fold] for fold in folds if fold]


def _blend(weights: tuple[float, ...], parts: Sequence[Floats]) -> Floats:
    return sum(b * p / _spread(p) for b, p in zip(weights, parts, strict=True))  # type: ignore[return-value]


def select(inputs: Inputs, examples: Sequence[Example], rows: Sequence[int]
           ) -> tuple[tuple[str, float], tuple[float, ...], float]:
    """The (head, blend) with the best mean held-out APGR across ``rows``' folds, and it."""
    import numpy as np

    rows = list(rows)
    pooled: dict[Any, list[Floats]] = {}
    order: list[int] = []
    for held in groups(examples, rows):
        held_set = set(held)
        # Sources may share prompts (mmlu_local asks MMLU's of our own tiers): a held-out
        # prompt stays out of the fit whichever source carries it.
        held_prompts = {normalise(examples[r].prompt) for r in held}
        fit = [r for r in rows if r not in held_set
               and normalise(examples[r].prompt) not in held_prompts]
        if len(fit) < MIN_PROMPTS:  # nothing left to fit on (a source of shared prompts)
            continue
        parts = _parts(inputs, examples, fit, reference_rows(examples, fit), np.asarray(held))
        shape, prior = parts.pop("shape"), parts.pop("prior")
        for head, emb in parts.items():
            for blend in BLENDS:
                pooled.setdefault((head, blend), []).append(_blend(blend, (emb, shape, prior)))
        order.extend(held)
    best: tuple[float, tuple[str, float], tuple[float, ...]] | None = None
    for (head, blend), chunks in pooled.items():
        apgr = _mean_apgr(np.concatenate(chunks), examples, order)
        if best is None or apgr > best[0] + 1e-9:
            best = (apgr, head, blend)
    if best is None:  # no fold had anything to fit on: the heuristic prior alone
        return ("knn", 16), (0.0, 0.0, 1.0), 0.0
    return best[1], best[2], best[0]


def fit(inputs: Inputs, examples: Sequence[Example], rows: Sequence[int],
        head: tuple[str, float] | None = None, blend: tuple[float, ...] | None = None,
        embedder: Embedder | None = None) -> tuple[SemanticModel, dict[str, Any]]:
    """The model fitted on ``rows`` (head and blend chosen by :func:`select` unless given),
    and its arrays as the artefact stores them."""
    import numpy as np

    rows = list(rows)
    chosen_apgr = None
    if head is None or blend is None:
        head, blend, chosen_apgr = select(inputs, examples, rows)
    ref = reference_rows(examples, rows)
    ref_pos = {r: i for i, r in enumerate(ref)}
    fit_a = np.asarray(rows)
    target, weights = targets(inputs, examples, rows)
    mean, scale, w = _ridge(inputs.features[fit_a], target, SHAPE_L2, True, weights)
    if head[0] == "linear":
        lmean, _, lw = _ridge(inputs.vectors[fit_a].astype(float), target, head[1], False, weights)
    else:
        lmean, lw = np.zeros(inputs.vectors.shape[1]), np.zeros(inputs.vectors.shape[1])
    position = {r: i for i, r in enumerate(rows)}
    ref_target = target[[position[r] for r in ref]]
    # Training predictions, each reference prompt not its own neighbour: spreads, quantiles.
    own = [ref_pos.get(r, -1) for r in rows]
    shape_pred = ((inputs.features[fit_a] - mean) / scale) @ w
    if head[0] == "knn":
        exclude = [o if o >= 0 else 0 for o in own]
        top = _top(inputs.vectors[fit_a], inputs.vectors[np.asarray(ref)], int(head[1]) + 1, exclude)
        emb_pred = ref_target[top[:, : int(head[1])]].mean(axis=1)
    else:
        emb_pred = (inputs.vectors[fit_a] - lmean) @ lw
    prior_pred = inputs.features[fit_a] @ inputs.prior_weights
    combined = _blend(blend, (emb_pred, shape_pred, prior_pred))
    sources = sorted({examples[r].source for r in ref})
    meta = {"head": head[0], "k": int(head[1]) if head[0] == "knn" else 0,
            "l2": head[1] if head[0] == "linear" else 0.0,
            "blend": dict(zip(PARTS, blend, strict=True)),
            "spread": {"embedding": _spread(emb_pred), "shape": _spread(shape_pred),
                       "prior": _spread(prior_pred)},
            "features": inputs.names, "dims": int(inputs.vectors.shape[1]),
            "examples": len(rows), "references": len(ref), "selection_apgr": chosen_apgr,
            "sources": {s: sum(1 for r in rows if examples[r].source == s)
                        for s in sorted({examples[r].source for r in rows})}}
    arrays: dict[str, Any] = {
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "vectors": inputs.vectors[np.asarray(ref)].astype(np.float16),
        "target": ref_target.astype(np.float32),
        "cheap_ok": np.array([examples[r].weak for r in ref], dtype=np.uint8),
        "strong_ok": np.array([examples[r].strong for r in ref], dtype=np.uint8),
        "source": np.array([sources.index(examples[r].source) for r in ref], dtype=np.uint8),
        "sources": np.array(sources),
        "excerpts": np.array([" ".join(examples[r].prompt.split())[:EXCERPT_CHARS]
                              for r in ref]),
        "feature_mean": mean, "feature_scale": scale, "feature_weights": w,
        "prior_weights": inputs.prior_weights,
        "linear": lw.astype(np.float32), "linear_mean": lmean.astype(np.float32),
        "quantiles": np.round(np.quantile(combined, np.linspace(0, 1, 101)), 8),
    }
    return SemanticModel(arrays, embedder), arrays


class NoSuchSource(ValueError):
    """``train(without=...)`` names a source that is not there, or leaves none."""


def train(data_dir: Path, out: Path = SEMANTIC_FILE, embedder: Embedder | None = None,
          without: Sequence[str] = ()) -> dict[str, Any]:
    """Fit on every labelled source but those named in ``without`` (to score one of them as
    unseen work) and write the artefact; returns its metadata."""
    import numpy as np

    sources = load_sources(data_dir)
    unknown = sorted(set(without) - set(sources))
    if unknown:
        raise NoSuchSource(f"no labelled source {', '.join(unknown)} under {data_dir}; "
                           f"there are {', '.join(sources)}")
    examples = [e for name, rows in sources.items()
                if len(rows) >= MIN_PROMPTS and name not in without for e in rows]
    if not examples:
        raise NoSuchSource(f"nothing left to train on under {data_dir} without "
                           f"{', '.join(without)}")
    embedder = embedder or Embedder.load(DIMS)
    inputs = prepare(examples, embedder)
    _, arrays = fit(inputs, examples, range(len(examples)))
    with Path(out).open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    meta: dict[str, Any] = json.loads(str(arrays["meta"]))
    return meta
