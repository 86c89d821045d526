"""The OpenAPI document of the gateway's HTTP surface (``GET /openapi.json`` when the
policy sets ``server.openapi: true``).

The request bodies of the two generation endpoints are the pydantic models that parse
them (:mod:`gateway.openai_types`), so the document cannot drift from what is accepted;
every error is the OpenAI error object.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from . import openai_types as wire
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
    for model in (wire.ChatCompletionRequest, wire.CompletionRequest, ResponsesRequest):
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
            "/v1/models": {"get": {"summary": "the models this key may use",
                                   "security": [{"bearer": []}],
                                   "responses": _responses(_json_ok("the model list"), _AUTH)}},
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
