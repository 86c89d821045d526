"""The OpenAPI document of the gateway's HTTP surface (``GET /openapi.json`` when the
policy sets ``server.openapi: true``).

Every endpoint the app serves is in it: the OpenAI API (chat, completions, responses,
embeddings, models, files and batches), health, metrics and the admin API. The request
bodies of chat, completions, responses and embeddings are the pydantic models that parse
them (:mod:`gateway.openai_types`, :mod:`gateway.responses`, :mod:`gateway.embeddings`), so
the document cannot drift from what is accepted; every error is the OpenAI error object.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from . import openai_types as wire
from .batches.wire import ENDPOINTS as BATCH_ENDPOINTS
from .batches.wire import PURPOSE as BATCH_PURPOSE
from .embeddings import EmbeddingsRequest
from .responses import ResponsesRequest

_REF = "#/components/schemas/{model}"
JSON = "application/json"
_ERROR_REF = {"$ref": "#/components/schemas/Error"}

#: Every status an endpoint may refuse with, beside its own.
_COMMON_ERRORS = {
    "408": "the request body did not arrive in time",
    "413": "the request body is too large",
    "431": "too many or too large request headers",
    "500": "an internal error",
    "503": "overloaded or unavailable; see Retry-After",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ERROR_REF}}}


def _responses(ok: dict[str, Any], *errors: tuple[str, str]) -> dict[str, Any]:
    responses = {"200": ok}
    for status, description in (*errors, *_COMMON_ERRORS.items()):
        responses[status] = _error(description)
    return responses


def _json_ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


_AUTH = ("401", "missing or invalid API key")
_NOT_FOUND = ("404", "no such tenant, or the admin API is off")
_BAD = ("400", "invalid request")


def _generation(model: str, summary: str) -> dict[str, Any]:
    ok = {"description": "the completion, or with stream: true its server-sent events",
          "content": {JSON: {"schema": {"type": "object"}},
                      # each event: a chunk object, an error object, or the string [DONE]
                      "text/event-stream": {"schema": {"type": ["object", "string"]}}}}
    return {"post": {
        "summary": summary, "security": [{"bearer": []}],
        "requestBody": {"required": True,
                        "content": {JSON: {"schema": {"$ref": _REF.format(model=model)}}}},
        "responses": _responses(ok, _BAD, _AUTH, ("429", "the tenant's joule budget is spent"),
                                ("502", "the backend failed"),
                                ("504", "the backend did not answer in time")),
    }}


def _admin(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary, "security": [{"bearer": []}],
        "parameters": [{"name": "tenant", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": _responses(_json_ok("done"), _BAD, _AUTH, _NOT_FOUND),
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return op


def _op(summary: str, ok: dict[str, Any], *errors: tuple[str, str],
        path: tuple[str, ...] = (), query: tuple[tuple[str, dict[str, Any]], ...] = (),
        body: dict[str, Any] | None = None, media: str = JSON) -> dict[str, Any]:
    """An operation of the OpenAI API that a tenant's key calls."""
    op: dict[str, Any] = {"summary": summary, "security": [{"bearer": []}],
                          "responses": _responses(ok, _AUTH, *errors)}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in path]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {media: {"schema": body}}}
    return op


def _batch_paths() -> dict[str, Any]:
    """``/v1/files`` and ``/v1/batches`` (:mod:`gateway.batches.api`), as OpenAI's."""
    missing = ("404", "no such file or batch for this key's tenant")
    limit = ("limit", {"type": "integer", "minimum": 1})
    upload = {"type": "object", "required": ["file", "purpose"],
              "properties": {"file": {"type": "string", "format": "binary"},
                             "purpose": {"const": BATCH_PURPOSE}}}
    create = {"type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
              "properties": {"input_file_id": {"type": "string"},
                             "endpoint": {"enum": list(BATCH_ENDPOINTS)},
                             "completion_window": {"type": "string"},
                             "metadata": {"type": ["object", "null"]}}}
    return {
        "/v1/files": {
            "get": _op("the tenant's files", _json_ok("a list of file objects"), _BAD,
                       query=(("purpose", {"type": "string"}), limit,
                              ("order", {"enum": ["asc", "desc"]}),
                              ("after", {"type": "string"}))),
            "post": _op("upload a batch input file (JSONL, checked line by line)",
                        _json_ok("the file object"), _BAD, body=upload,
                        media="multipart/form-data")},
        "/v1/files/{file_id}": {
            "get": _op("a file object", _json_ok("the file object"), missing,
                       path=("file_id",)),
            "delete": _op("delete a file", _json_ok("the deletion"), missing,
                          path=("file_id",))},
        "/v1/files/{file_id}/content": {
            "get": _op("a file's bytes", {"description": "the file", "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}},
                missing, path=("file_id",))},
        "/v1/batches": {
            "get": _op("the tenant's batches, newest first", _json_ok("a list of batches"),
                       _BAD, query=(("after", {"type": "string"}), limit)),
            "post": _op("create a batch (with `carbon`: where and when it runs)",
                        _json_ok("the batch object"), _BAD, missing, body=create)},
        "/v1/batches/{batch_id}": {
            "get": _op("a batch", _json_ok("the batch object"), missing, path=("batch_id",))},
        "/v1/batches/{batch_id}/cancel": {
            "post": _op("cancel a batch that is validating or in progress",
                        _json_ok("the batch object"), _BAD, missing, path=("batch_id",))},
    }


def openapi_spec(app: FastAPI) -> dict[str, Any]:
    """The document, built once per app and kept."""
    cached: dict[str, Any] | None = getattr(app.state, "openapi_spec", None)
    if cached is not None:
        return cached
    schemas: dict[str, Any] = {"Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "null"]}}}}}}
    for model in (wire.ChatCompletionRequest, wire.CompletionRequest, ResponsesRequest,
                  EmbeddingsRequest):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # What the validators of a message accept, which its field types alone do not say.
    message = schemas.get("ChatMessage", {}).get("properties", {})
    if "role" in message:
        message["role"] = {"type": "string", "enum": ["system", "developer", "user", "assistant"]}
    if "content" in message:
        message["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
    token_ids = {"type": "array", "minItems": 1,
                 "items": {"type": "integer", "minimum": 0, "maximum": (1 << 31) - 1}}
    schemas["EmbeddingsRequest"]["properties"]["input"] = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        token_ids, {"type": "array", "minItems": 1, "items": token_ids}]}
    window = {"type": "string", "minLength": 1}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": app.title, "version": app.version},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": _generation("ChatCompletionRequest", "chat completion"),
            "/v1/completions": _generation("CompletionRequest", "text completion"),
            "/v1/responses": _generation("ResponsesRequest", "a response (the Responses API)"),
            "/v1/embeddings": {"post": _op(
                "embeddings", _json_ok("the embedding list"), _BAD,
                ("429", "the tenant's joule budget is spent"), ("502", "the backend failed"),
                ("504", "the backend did not answer in time"),
                body={"$ref": _REF.format(model="EmbeddingsRequest")})},
            "/v1/models": {"get": {"summary": "the models this key may use",
                                   "security": [{"bearer": []}],
                                   "responses": _responses(_json_ok("the model list"), _AUTH)}},
            "/v1/models/{model_id}": {"get": _op(
                "one model this key may use", _json_ok("the model object"),
                ("404", "no such model for this key"), path=("model_id",))},
            **_batch_paths(),
            "/healthz": {"get": {"summary": "liveness",
                                 "responses": _responses(_json_ok("alive"))}},
            "/readyz": {"get": {"summary": "readiness; details only with the metrics token "
                                           "when the policy sets one",
                                "responses": {**_responses(_json_ok("ready")),
                                              "503": _json_ok("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": _responses(
                                     {"description": "the exposition",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                                     _AUTH)}},
            "/admin/reload": {"post": {"summary": "reload the policy",
                                       "security": [{"bearer": []}],
                                       "responses": _responses(_json_ok("reloaded"), _BAD, _AUTH,
                                                               _NOT_FOUND)}},
            "/admin/tenants/{tenant}/budget": {"get": _admin("a tenant's budget windows")},
            "/admin/tenants/{tenant}/budget/reset": {"post": _admin(
                "reset one window, or all of them with all: true",
                {"oneOf": [
                    {"type": "object", "required": ["window"], "additionalProperties": False,
                     "properties": {"window": window}},
                    {"type": "object", "required": ["all"], "additionalProperties": False,
                     "properties": {"all": {"const": True}}}]})},
            "/admin/tenants/{tenant}/budget/grant": {"post": _admin(
                "grant extra joules in a window",
                {"type": "object", "required": ["window", "joules"],
                 "properties": {"window": window,
                                "joules": {"type": "number", "exclusiveMinimum": 0}}})},
        },
    }
    app.state.openapi_spec = spec
    return spec
