"""What a backend kind declares about itself: its settings, capabilities and how it is built.

Each backend module ends with one :class:`BackendKind`; :mod:`backends.registry` lists them.
Everything else reads a kind from there: the policy schema builds its ``backends`` union from
the kinds' settings models, energy accounting meters by :attr:`Capabilities.local`, the
gateway's preflight names each kind's missing :class:`Requirement`, and the runtime calls
:attr:`BackendKind.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .base import Backend


class Settings(BaseModel):
    """Base of every kind's settings model: an unknown key is an error, values are frozen.

    The policy adds ``kind`` and ``energy`` to each (:func:`policies.schema.backend_spec`);
    a kind's settings hold only what its backend reads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a kind can do, for routing and metering to read instead of probing backends."""

    #: Chat and text completions (``complete``); False for an embeddings-only kind.
    generation: bool = True
    streaming: bool = False
    #: ``tools``/``tool_choice``/``parallel_tool_calls`` and tool messages are served, and
    #: :class:`~backends.base.Generation`/:class:`~backends.base.Chunk` carry ``tool_calls``.
    #: For an HTTP kind this means pass-through: the fields go to the upstream as given and
    #: the upstream's answer decides (a model served without tool support refuses there).
    tools: bool = False
    #: ``response_format`` ``json_object``/``json_schema`` (pass-through for HTTP kinds).
    structured_output: bool = False
    embeddings: bool = False
    #: ``logprobs``/``top_logprobs`` (pass-through for HTTP kinds).
    logprobs: bool = False
    #: The prompt's own tokens scored (``GenerationRequest.prompt_logprobs``), as the
    #: cascade's ``signal: prompt`` reads them.
    prompt_logprobs: bool = False
    #: Fill in the middle (``GenerationRequest.suffix``): llama.cpp with a model that has
    #: fill-in-the-middle tokens (it refuses the request otherwise); pass-through for HTTP
    #: kinds (vLLM serves it for models whose renderer writes FIM prompts).
    insertion: bool = False
    #: The model runs in this process, on this host, so a host meter (RAPL, CPU time)
    #: measures it; otherwise it is a remote upstream, metered by an exporter or priced
    #: per token.
    local: bool = False


@dataclass(frozen=True, slots=True)
class Requirement:
    """A Python package that must be installed in the gateway's own environment."""

    #: The import name looked for (``importlib.util.find_spec``), e.g. ``llama_cpp``.
    module: str
    #: What pip installs, as users know it, e.g. ``llama-cpp-python``.
    package: str
    #: The joulegate extra that brings it (pyproject.toml), e.g. ``llamacpp``.
    extra: str
    #: "" when every backend of the kind needs it, else the mode that does (``managed``).
    mode: str = ""
    #: Another way out, said after the install command.
    hint: str = ""

    @property
    def install(self) -> str:
        return f"pip install 'joulegate[{self.extra}]'"


def _always(settings: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class BackendKind:
    """One kind of backend, as a policy names it (``kind: llamacpp``)."""

    name: str
    #: The settings a policy entry of this kind takes (a :class:`Settings` subclass).
    settings: type[Settings]
    capabilities: Capabilities
    #: ``build(backend name, settings)`` → an unstarted backend. ``settings`` is an instance
    #: of :attr:`settings` (the policy's entry, which may carry more fields).
    build: Callable[[str, Any], Backend]
    #: An optional package this kind needs beyond joulegate's own dependencies.
    requirement: Requirement | None = None
    #: Whether an entry's settings, as written in the policy (a mapping, possibly invalid
    #: elsewhere), need :attr:`requirement`; default: every entry does.
    needs_requirement: Callable[[Mapping[str, Any]], bool] = _always
