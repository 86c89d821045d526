"""Every backend kind a policy may name, one line per module, in the order error messages
list them. A new kind is one module declaring its :class:`~backends.kind.BackendKind`
(``KIND``) plus one line here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from . import llamacpp, openai_http, vllm, wordllama_embed
from .kind import BackendKind

#: Kind name (as written in policies) → its descriptor. Read-only.
KINDS: Mapping[str, BackendKind] = MappingProxyType({kind.name: kind for kind in (
    llamacpp.KIND,
    openai_http.KIND,
    vllm.KIND,
    wordllama_embed.KIND,
)})
