"""``POST /v1/embeddings``: the same steps as a generation (:mod:`gateway.pipeline`), on the
tiers that serve embeddings.

1. take the policy snapshot; authenticate the key → tenant;
2. :func:`_read`: the body, validated (:class:`EmbeddingsRequest`, the OpenAI wire format:
   ``input`` a string, a list of strings, or token-id lists; ``dimensions``;
   ``encoding_format`` ``float`` or ``base64``; ``user``);
3. :func:`_plan`: the tier — pinned, or for ``model: auto`` the cheapest tier of the tenant
   that serves embeddings — among the tiers whose backend kind has
   ``capabilities.embeddings`` only (:mod:`gateway.capabilities`: anything else is a 400
   naming the missing capability);
4. the pipeline's admission: the prompt's predicted joules (no output tokens) reserved
   against the tenant's budgets;
5. :func:`_embed`: the backend's :meth:`~backends.base.Backend.embed` with the request's
   energy share open on its device (falling back like a generation);
6. the pipeline's :func:`~gateway.pipeline.finish`: settle, metrics, access record.

The answer is OpenAI's: ``{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``, plus
``usage.energy_joules``/``energy_source`` and the ``X-Joulegate-*`` headers. With
``encoding_format: base64`` each embedding is the base64 of its little-endian float32 bytes.
"""

from __future__ import annotations

import base64
import sys
from array import array
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response

from backends import Backend, GenerationRequest
from backends.base import EmbeddingRequest, Embeddings
from policies import AUTO_MODEL

from . import openai_types as wire
from .call import Call
from .pipeline import run_request
from .routing import Decision, TierPlan, pick_tier
from .runtime import Runtime, Snapshot
from .steps import answer_headers, on_plan, read_body, request_id, route_context

#: OpenAI's limit on the inputs of one request.
MAX_INPUTS = 2048


class EmbeddingsRequest(BaseModel):
    """The body of ``POST /v1/embeddings``; anything else is a 400 that names it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    input: Any
    dimensions: int | None = Field(None, ge=1, le=1 << 16)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[str] | list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of token-id lists."""
        if isinstance(value, str):
            value = [value]
        elif not isinstance(value, list):
            raise PydanticCustomError("invalid_type", "input must be a string, a list of "
                                      "strings or a list of token-id lists")
        if not value:
            raise PydanticCustomError("invalid_value", "input must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise PydanticCustomError("invalid_value", "input takes at most {n} items",
                                      {"n": MAX_INPUTS})
        items: list[Any] = value
        if all(isinstance(v, str) for v in items):
            if any(not v for v in items):
                raise PydanticCustomError("invalid_value", "input must not contain empty strings")
            return items
        if all(_token_id(v) for v in items):
            return [items]  # one text as token ids
        if all(isinstance(v, list) and v and all(_token_id(t) for t in v) for v in items):
            return items
        raise PydanticCustomError("invalid_type", "input must be a string, a list of non-empty "
                                  "strings, a list of token ids, or a list of non-empty token-id "
                                  "lists")

    def prompt_estimate(self) -> int:
        """The inputs' size in tokens: token ids counted, text at ~4 characters per token."""
        inputs: list[str] | list[list[int]] = self.input
        return sum(len(v) // 4 + 1 if isinstance(v, str) else len(v) for v in inputs)


def _token_id(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 31


@dataclass(slots=True)
class EmbeddingCall(Call):
    """A :class:`~gateway.pipeline.Call` that embeds instead of generating."""

    embedding: EmbeddingRequest | None = None
    encoding_format: str = "float"

    @property
    def endpoint(self) -> str:
        return "embeddings"

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                                 "total_tokens": self.prompt_tokens}
        if self.energy is not None:
            usage.update(energy_joules=round(self.joules, 6), energy_source=self.energy.source)
            usage.update(self.footprint_usage())
        return usage


async def handle_embeddings(runtime: Runtime, request: Request) -> Response:
    """Serve ``POST /v1/embeddings``."""
    return await run_request(runtime, request, EmbeddingCall(request_id(request), chat=False),
                             _read, _embed, _plan)


async def _read(snap: Snapshot, call: EmbeddingCall, request: Request) -> None:
    """The body, size-limited and validated, as the backend request. The budget sees it
    as a generation of no output tokens."""
    server = snap.policy.server
    raw = await read_body(request, server.max_body_bytes, server.limits.body_read_timeout_s)
    body: EmbeddingsRequest = wire.parse_request(EmbeddingsRequest, raw)  # type: ignore[arg-type]
    call.model, call.encoding_format = body.model, body.encoding_format
    call.embedding = EmbeddingRequest(body.model, body.input, body.dimensions, body.user,
                                      call.request_id)
    call.generation = GenerationRequest(model=body.model, max_tokens=0, user=body.user,
                                        request_id=call.request_id)
    call.prompt_estimate = body.prompt_estimate()


def _plan(runtime: Runtime, snap: Snapshot, call: EmbeddingCall, max_tier: str | None) -> None:
    """Among the tenant's embedding tiers: the pinned one, or for ``auto`` the cheapest
    (the one predicted to spend the fewest joules among equally cheap ones)."""
    ctx = route_context(runtime, snap, call, capability="embeddings")
    if call.model == AUTO_MODEL:
        decision = Decision(min(ctx.tiers, key=lambda t: (t.cost, ctx.predict(t))), "gate")
    else:
        decision = pick_tier(ctx, call.model or "", call.req, max_tier)
    call.plan = TierPlan.route(ctx, decision)


async def _embed(runtime: Runtime, snap: Snapshot, call: EmbeddingCall) -> Response:
    embedding, generation = call.embedding, call.req
    assert embedding is not None  # set by _read

    async def attempt(_: Call, backend: Backend) -> Embeddings:
        embedding.model, embedding.progress = generation.model, generation.progress
        try:
            result = await backend.embed(embedding)
            if result.prompt_tokens == 0:  # an upstream that reports no usage: the estimate
                result.prompt_tokens = embedding.progress.prompt_tokens = call.prompt_estimate
            return result
        finally:
            call.prompt_tokens = embedding.progress.prompt_tokens
            call.settle_energy()

    result = await on_plan(runtime, snap, call, attempt)
    call.prompt_tokens = result.prompt_tokens
    encode = _base64 if call.encoding_format == "base64" else None
    data = [{"object": "embedding", "index": i,
             "embedding": encode(vector) if encode is not None else vector}
            for i, vector in enumerate(result.vectors)]
    payload = {"object": "list", "data": data, "model": call.planned.tier.model,
               "usage": call.usage()}
    return Response(orjson.dumps(payload), media_type="application/json",
                    headers=answer_headers(call))


def _base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: the vector's float32 bytes, little-endian."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
