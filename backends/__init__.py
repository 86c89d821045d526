"""Model backends behind one small interface (:class:`backends.base.Backend`).

One module per kind, each declaring its settings, capabilities and how it is built
(:class:`backends.kind.BackendKind`); :data:`KINDS` (:mod:`backends.registry`) lists them.
Optional runtime packages (llama-cpp-python) are imported only when a backend starts, so a
gateway without them still loads every policy and reports what is missing. This package
never imports ``gateway`` or ``policies``.
"""

from __future__ import annotations

from .base import (
    Backend,
    BackendError,
    BackendFailure,
    BackendInvalidResponse,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    ContextWindowExceeded,
    FeatureUnsupported,
    Generation,
    GenerationRequest,
    Health,
    Load,
    Usage,
)
from .features import TokenLogprob
from .kind import BackendKind, Capabilities, Requirement, Settings
from .registry import KINDS
from .wordllama_embed import load_wordllama

__all__ = [
    "KINDS", "Backend", "BackendError", "BackendFailure", "BackendInvalidResponse",
    "BackendKind", "BackendRejected", "BackendTimeout", "BackendUnavailable", "Capabilities",
    "Chunk", "ContextWindowExceeded", "FeatureUnsupported", "Generation", "GenerationRequest", "Health", "Load", "Requirement", "Settings", "TokenLogprob",
    "Usage",
    "load_wordllama",
]
