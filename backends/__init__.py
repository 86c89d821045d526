"""Model backends behind one small interface (:class:`backends.base.Backend`).

One module per kind; :func:`create_backend` builds one from a policy's settings. Modules
are imported lazily so that a gateway without llama.cpp installed can still serve HTTP
upstreams. This package never imports ``gateway``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    Backend,
    BackendError,
    BackendFailure,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    Generation,
    GenerationRequest,
    Health,
    Usage,
)

#: Backend kind (as written in policies) → "module:class".
KINDS: dict[str, str] = {
    "llamacpp": "backends.llamacpp:LlamaCppBackend",
    "openai": "backends.openai_http:OpenAIBackend",
    "vllm": "backends.vllm:VLLMBackend",
}


def create_backend(name: str, kind: str, settings: dict[str, Any]) -> Backend:
    """Instantiate the backend ``kind`` named ``name`` from its policy settings."""
    module_name, _, class_name = KINDS[kind].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(name, settings)


__all__ = [
    "KINDS", "Backend", "BackendError", "BackendFailure", "BackendRejected", "BackendTimeout",
    "BackendUnavailable", "Chunk", "Generation", "GenerationRequest", "Health", "Usage",
    "create_backend",
]
