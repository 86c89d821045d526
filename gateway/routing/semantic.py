"""The ``semantic`` estimator's model: prompt embeddings, nearest labelled prompts, and
topic-independent shape features, combined.

A prompt is embedded with WordLlama (MIT; a static embedding: the mean of its tokens' learned
vectors, NumPy only, loaded from the weights and tokenizer its PyPI package ships, downloads
disabled). The model predicts the *gain* of the strong tier on it (strong right minus cheap
right, relative to the mean gain of the prompt's own source: routing ranks prompts within a
workload) as a blend of two parts, each divided by its
spread on the training prompts:

- the embedding part: either the mean gain of the ``k`` most similar labelled prompts
  (``head: knn``; cosine similarity over the shipped vectors), or a ridge head over the
  embedding (``head: linear``);
- the shape part: a ridge regression over :func:`gateway.routing.features.extract`'s
  features, which describe the form of a task rather than its topic and so carry over to
  kinds of task the embeddings have never seen;
- the prior: the ``heuristic`` estimator's hand-set logit over the same features (fitted to
  nothing, so it cannot overfit a training source).

The three weights are chosen by leave-one-source-out across the training sources, so the
blend is the one that carried over best to a source it was not fitted on.

The artefact (``semantic_model.npz`` beside this module) is written by
``joulegate router train`` (:mod:`.semantic_train`); everything it needs at run time is in
that file and in the installed ``wordllama`` package, loaded once at policy load. NumPy comes
with ``wordllama``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .features import RequestText, extract

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Floats = NDArray[np.float32]

SEMANTIC_FILE = Path(__file__).with_name("semantic_model.npz")
#: The WordLlama configuration whose weights its package carries, and its native size.
WORDLLAMA_CONFIG, WORDLLAMA_DIMS = "l2_supercat", 256
#: The embedding reads at most this many characters of a prompt (half its head, half its
#: tail): tokenising is most of its cost.
EMBED_CHARS = 1536
INSTALL_HINT = "pip install 'joulegate[models]'"


class SemanticUnavailable(ValueError):
    """The semantic estimator cannot load: a missing package or artefact (a policy error)."""


class Embedder:
    """Unit-length WordLlama embeddings of prompt text, cut to ``dims`` (Matryoshka)."""

    def __init__(self, table: Any, tokenizer: Any, dims: int):
        self.table = table[:, :dims].copy()
        self.tokenizer = tokenizer
        self.dims = dims

    @classmethod
    def load(cls, dims: int = WORDLLAMA_DIMS) -> Embedder:
        from backends import BackendUnavailable, load_wordllama

        try:
            table, tokenizer = load_wordllama(WORDLLAMA_CONFIG)
        except BackendUnavailable:
            raise SemanticUnavailable(
                "difficulty estimator 'semantic' needs the wordllama package (prompt "
                f"embeddings), which is not installed: {INSTALL_HINT}") from None
        except (OSError, ValueError) as exc:
            raise SemanticUnavailable(f"difficulty estimator 'semantic': cannot load WordLlama "
                                      f"'{WORDLLAMA_CONFIG}' from its package: {exc}") from None
        return cls(table, tokenizer, dims)

    def embed(self, text: str) -> Floats:
        import numpy as np

        if len(text) > EMBED_CHARS:  # head and tail: bounded cost for any prompt size
            text = text[:EMBED_CHARS // 2] + "\n" + text[-EMBED_CHARS // 2:]
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            return np.zeros(self.dims, dtype=np.float32)
        v = self.table[np.clip(ids, 0, len(self.table) - 1)].mean(axis=0)
        norm = float(np.linalg.norm(v))
        return np.asarray(v / norm if norm > 0 else v, dtype=np.float32)

    def embed_many(self, texts: list[str]) -> Floats:
        import numpy as np

        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.embed(text)
        return out


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A labelled training prompt near the one scored."""

    similarity: float
    source: str
    excerpt: str
    cheap_ok: bool
    strong_ok: bool


class SemanticModel:
    """The fitted model (see the module docstring); ``predict`` is the request path."""

    def __init__(self, arrays: dict[str, Any], embedder: Embedder | None):
        import numpy as np

        meta = json.loads(str(arrays["meta"]))
        self.meta: dict[str, Any] = meta
        self.head: str = meta["head"]
        self.k: int = int(meta["k"])
        #: Weight of the embedding, shape and prior parts, each over its spread.
        self.blend: dict[str, float] = {k: float(v) for k, v in meta["blend"].items()}
        self.spread: dict[str, float] = {k: float(v) for k, v in meta["spread"].items()}
        self.feature_names: list[str] = list(meta["features"])
        self.vectors = np.asarray(arrays["vectors"], dtype=np.float32)
        #: Each stored prompt's gain relative to its source's mean gain.
        self.target = np.asarray(arrays["target"], dtype=np.float32)
        self.cheap_ok = np.asarray(arrays["cheap_ok"], dtype=bool)
        self.strong_ok = np.asarray(arrays["strong_ok"], dtype=bool)
        self.source_index = np.asarray(arrays["source"], dtype=np.int64)
        self.sources: list[str] = [str(s) for s in arrays["sources"]]
        self.excerpts: list[str] = [str(s) for s in arrays["excerpts"]]
        self.feature_mean = np.asarray(arrays["feature_mean"], dtype=np.float64)
        self.feature_scale = np.asarray(arrays["feature_scale"], dtype=np.float64)
        self.feature_weights = np.asarray(arrays["feature_weights"], dtype=np.float64)
        self.prior_weights = np.asarray(arrays["prior_weights"], dtype=np.float64)
        self.linear = np.asarray(arrays["linear"], dtype=np.float32)
        self.linear_mean = np.asarray(arrays["linear_mean"], dtype=np.float32)
        #: Sorted predictions on the training prompts (leave-self-out): score = quantile.
        self.quantiles: list[float] = [float(q) for q in arrays["quantiles"]]
        self.embedder = embedder

    @classmethod
    def load(cls, path: Path = SEMANTIC_FILE, embedder: Embedder | None = None) -> SemanticModel:
        try:
            import numpy as np
        except ImportError:
            raise SemanticUnavailable("difficulty estimator 'semantic' needs NumPy (it comes "
                                      f"with wordllama): {INSTALL_HINT}") from None
        if embedder is None:
            embedder = Embedder.load()
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except OSError as exc:
            raise SemanticUnavailable(f"difficulty estimator 'semantic': cannot read its model "
                                      f"{path}: {exc}; rebuild it with `joulegate router train`"
                                      ) from None
        try:
            model = cls(arrays, embedder)
        except KeyError as exc:
            raise SemanticUnavailable(f"difficulty estimator 'semantic': its model {path} lacks "
                                      f"{exc}; rebuild it with `joulegate router train`") from None
        if embedder.dims != model.vectors.shape[1]:
            embedder = Embedder(embedder.table, embedder.tokenizer, model.vectors.shape[1])
            model.embedder = embedder
        return model

    # -- the arithmetic, shared with training ------------------------------------------

    def shape_parts(self, features: dict[str, float]) -> tuple[float, float]:
        """(shape part, prior part)."""
        import numpy as np

        x = np.array([features[n] for n in self.feature_names])
        return (float(((x - self.feature_mean) / self.feature_scale) @ self.feature_weights),
                float(x @ self.prior_weights))

    def nearest(self, vector: Floats, k: int) -> tuple[Any, Any]:
        """Indices of the ``k`` most similar stored prompts (most similar first) and their
        cosine similarities."""
        import numpy as np

        sims = self.vectors @ vector
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return top, sims[top]

    def embedding_part(self, vector: Floats) -> float:
        if self.head == "knn":
            top, _ = self.nearest(vector, self.k)
            return float(self.target[top].mean())
        return float((vector - self.linear_mean) @ self.linear)

    def combine(self, embedding: float, shape: float, prior: float) -> float:
        b, s = self.blend, self.spread
        return (b["embedding"] * embedding / s["embedding"] + b["shape"] * shape / s["shape"]
                + b["prior"] * prior / s["prior"])

    def predict_text(self, text: RequestText) -> tuple[float, dict[str, float]]:
        """(prediction, features) for a request's text."""
        assert self.embedder is not None
        features = extract(text)
        embedding = (self.embedding_part(self.embedder.embed(text.last))
                     if self.blend["embedding"] > 0 else 0.0)
        return self.combine(embedding, *self.shape_parts(features)), features

    def neighbours(self, text: RequestText, k: int = 5) -> list[Neighbour]:
        assert self.embedder is not None
        top, sims = self.nearest(self.embedder.embed(text.last), k)
        return [Neighbour(round(float(s), 4), self.sources[self.source_index[i]],
                          self.excerpts[i], bool(self.cheap_ok[i]), bool(self.strong_ok[i]))
                for i, s in zip(top, sims, strict=True)]
