"""A small embedding model served in-process: WordLlama (``kind: wordllama``).

WordLlama (MIT) is a static embedding model: each token of a Llama-2 tokenizer has a
learned vector and a text's embedding is the mean of its tokens' vectors, so it needs no
GPU and no attention, only a table lookup (NumPy). Its PyPI package ships the weights
(``l2_supercat``, 32,000 tokens x 256 dimensions, 16 MB) and the tokenizer, so it loads
offline in well under a second; it is loaded from the package's own folder with downloads
disabled, and never reaches the network.

Its vectors were trained Matryoshka-style (the first 64, 128 and 256 dimensions are each a
usable embedding), so a request's ``dimensions`` keeps the first ``dimensions`` values and
renormalises them; sizes between those points are prefixes too, with quality in between.
Vectors are unit length, as OpenAI's are, so a dot product is the cosine similarity.

The work runs on the backend's own worker threads, never on the event loop. The kind serves
embeddings only: chat and text completions are refused (:class:`BackendRejected`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .base import (
    Backend,
    BackendRejected,
    BackendUnavailable,
    Chunk,
    EmbeddingRequest,
    Embeddings,
    Generation,
    GenerationRequest,
    Health,
)
from .kind import BackendKind, Capabilities, Requirement, Settings

_WORDLLAMA = Requirement("wordllama", "wordllama", "models")
#: The configurations whose weights the package carries, and their native size.
_BUNDLED = {"l2_supercat": 256}
_IMPORT_LOCK = threading.Lock()


class WordLlamaSettings(Settings):
    """WordLlama static embeddings, in-process (NumPy), from the weights its package ships."""

    #: The bundled configuration.
    config: Literal["l2_supercat"] = "l2_supercat"
    #: The size of the vectors returned when a request gives no ``dimensions`` (a
    #: Matryoshka size: 64, 128 or 256); a request may ask for fewer, never more.
    dimensions: Literal[64, 128, 256] = 256
    #: Worker threads embedding at once.
    threads: int = Field(1, ge=1, le=64)


def _import_wordllama() -> Any:
    """Import the package without letting it configure the root logger (its inference
    module calls ``logging.basicConfig`` on import)."""
    root = logging.getLogger()
    with _IMPORT_LOCK:
        handlers, level = list(root.handlers), root.level
        try:
            import wordllama  # type: ignore[import-untyped,import-not-found,unused-ignore]
        finally:
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
    return wordllama


def load_wordllama(config: str) -> tuple[Any, Any]:
    """The (vocabulary x dimensions) float32 table and the tokenizer, from the package
    (downloads off); :class:`BackendUnavailable` when the package is not installed."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise BackendUnavailable(f"{_WORDLLAMA.package} is not installed: {_WORDLLAMA.install}")
    package = Path(spec.origin).parent
    wordllama = _import_wordllama()
    # The package's own folder as the cache: its weights/ and tokenizers/ folders are where
    # the loader looks there (0.4.0 looks for the tokenizer in the wrong folder otherwise).
    model = wordllama.WordLlama.load(config, cache_dir=package, dim=_BUNDLED[config],
                                     disable_download=True)
    tokenizer = model.tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return model.embedding, tokenizer


class WordLlamaBackend(Backend):
    kind = "wordllama"

    def __init__(self, name: str, settings: WordLlamaSettings):
        super().__init__(name)
        self.config = settings.config
        self.dimensions: int = settings.dimensions
        self.threads = settings.threads
        self._table: Any = None
        self._tokenizer: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._error = ""

    async def start(self) -> None:
        try:
            self._table, self._tokenizer = await asyncio.to_thread(load_wordllama, self.config)
        except ImportError:
            self._error = f"{_WORDLLAMA.package} is not installed: {_WORDLLAMA.install}"
            raise BackendUnavailable(self._error) from None
        except (OSError, ValueError) as exc:  # FileNotFoundError: a broken install
            self._error = f"cannot load WordLlama '{self.config}': {exc}"
            raise BackendUnavailable(self._error) from None
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=f"embed-{self.name}")

    async def close(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
        self._table = self._tokenizer = None

    async def health(self) -> Health:
        if self._executor is None:
            return Health(False, self._error or "model not loaded")
        return Health(True, "ok", {"dimensions": self.dimensions})

    # -- embeddings ---------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        if self._executor is None:
            raise BackendUnavailable(f"backend '{self.name}' is not loaded")
        size = self.dimensions if request.dimensions is None else request.dimensions
        if not 1 <= size <= self.dimensions:
            raise BackendRejected(f"'dimensions' must be between 1 and {self.dimensions} for "
                                  f"this model", param="dimensions")
        if not all(isinstance(item, str) for item in request.inputs):
            raise BackendRejected("this model takes text input only, not token ids (it has its "
                                  "own tokenizer)", param="input")
        texts: list[str] = request.inputs  # type: ignore[assignment]  # checked above
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed, texts, size, request)

    def _embed(self, texts: list[str], size: int, request: EmbeddingRequest) -> Embeddings:
        """On a worker thread: each text's mean token vector, cut to ``size``, unit length."""
        import numpy as np

        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        tokens = sum(len(i) for i in ids)
        request.progress.prompt_tokens = tokens
        table = self._table
        out = np.zeros((len(texts), size), dtype=np.float32)
        for row, token_ids in enumerate(ids):
            if len(token_ids):
                out[row] = table[np.clip(token_ids, 0, len(table) - 1), :size].mean(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return Embeddings(out.tolist(), tokens)

    # -- no generation ------------------------------------------------------------------

    def _no_generation(self) -> BackendRejected:
        return BackendRejected(f"backend '{self.name}' is an embedding model: it serves "
                               "POST /v1/embeddings only", param="model")

    async def complete(self, request: GenerationRequest) -> Generation:
        raise self._no_generation()

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        raise self._no_generation()


KIND = BackendKind(WordLlamaBackend.kind, WordLlamaSettings,
                   Capabilities(generation=False, embeddings=True, local=True),
                   WordLlamaBackend, requirement=_WORDLLAMA)
