"""The OpenAI embeddings call as an HTTP upstream sees it: the body sent to
``POST {base_url}/embeddings`` and the answer checked field by field.

The gateway always asks the upstream for ``encoding_format: float`` (it encodes base64
itself, for the client), and reads back exactly what it relays: one ``embedding`` list of
numbers per input, placed by ``index``, all of one length, and ``usage.prompt_tokens``.
Anything else in the answer is ignored; anything wrong in what is read is :class:`Malformed`.
"""

from __future__ import annotations

from typing import Any

import orjson

from .base import EmbeddingRequest

_MAX_TOKEN_COUNT = 1 << 31


class Malformed(ValueError):
    """What is wrong with an upstream's embeddings answer (safe to show a client)."""


def embeddings_body(request: EmbeddingRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model, "input": request.inputs,
                            "encoding_format": "float"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.user is not None:
        body["user"] = request.user
    return orjson.dumps(body)


def _vector(item: object, position: int) -> tuple[int, list[float]]:
    if not isinstance(item, dict):
        raise Malformed(f"data[{position}] is a {type(item).__name__}, not an object")
    index = item.get("index", position)
    if type(index) is not int:
        raise Malformed(f"data[{position}].index is not an integer")
    vector = item.get("embedding")
    if not isinstance(vector, list) or not vector:
        raise Malformed(f"data[{position}].embedding is not a list of numbers")
    for x in vector:
        if type(x) is not float and type(x) is not int:
            raise Malformed(f"data[{position}].embedding holds a {type(x).__name__}")
    return index, vector


def parse_embeddings(raw: bytes, inputs: int) -> tuple[list[list[float]], int]:
    """One vector per input, in input order, and the prompt tokens the upstream reports
    (0 when it reports none). Raises :class:`Malformed`."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Malformed("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise Malformed(f"the answer is a JSON {type(data).__name__}, not an object")
    items = data.get("data")
    if not isinstance(items, list):
        raise Malformed("the answer has no data list")
    if len(items) != inputs:
        raise Malformed(f"{len(items)} embeddings for {inputs} inputs")
    vectors: list[list[float] | None] = [None] * inputs
    for position, item in enumerate(items):
        index, vector = _vector(item, position)
        if not 0 <= index < inputs or vectors[index] is not None:
            raise Malformed(f"data[{position}].index {index} is out of range or repeated")
        vectors[index] = vector
    done = [v for v in vectors if v is not None]
    if len({len(v) for v in done}) != 1:
        raise Malformed("the embeddings differ in length")
    usage = data.get("usage")
    tokens = 0
    if usage is not None:
        if not isinstance(usage, dict):
            raise Malformed(f"usage is a {type(usage).__name__}, not an object")
        n = usage.get("prompt_tokens")
        if n is not None:
            if type(n) is not int or not 0 <= n < _MAX_TOKEN_COUNT:
                raise Malformed("usage.prompt_tokens is not a token count")
            tokens = n
    return done, tokens
