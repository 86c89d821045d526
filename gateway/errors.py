"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see is an :class:`APIError`, and this module is the one place
that says which: the gateway's own refusals are subclasses here, and the typed failures of
the layers below (backend errors, routing refusals) are translated by :func:`to_api_error`.
Nothing else reaches the client: unexpected exceptions become a generic 500 with no stack
trace (the trace goes to the log).
"""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends.base import (
    BackendError,
    BackendFailure,
    BackendInvalidOutput,
    BackendInvalidResponse,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ContextWindowExceeded,
)
from policies import PolicyError

from .routing.tiers import AboveMaxTier, ModelNotFound, RouteRefusal
from .tier_slots import TierQueueFull

log = logging.getLogger("joulegate")


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    #: Request fields this error refuses (for the access log); ``param`` is the first.
    rejected_params: tuple[str, ...] = ()

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status,
                        media_type="application/json", headers=self.headers)


class InvalidRequest(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401
    code = "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message, headers={"www-authenticate": "Bearer"})


class NotFound(APIError):
    status = 404
    code = "not_found"


class BodyTooLarge(APIError):
    status = 413
    code = "request_too_large"


class UpstreamError(APIError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamInvalidResponse(UpstreamError):
    """The upstream answered something that is not an OpenAI response."""

    code = "upstream_invalid_response"


class ModelOutputInvalid(UpstreamError):
    """The model's output broke the request's contract (a tool call that does not parse,
    JSON that does not match the schema): the request was valid, the answer could not be
    made so, and nothing partial is returned. 502, like any unusable upstream answer."""

    code = "model_output_invalid"


class ServiceUnavailable(APIError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamTimeout(APIError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class BudgetExhausted(APIError):
    """The request fits the tenant's budget, but not now: retry after ``Retry-After``."""

    status = 429
    type = "rate_limit_error"
    code = "budget_exhausted"


class BudgetNeverFits(APIError):
    """The request is larger than a budget window's whole limit: no wait would help."""

    status = 400
    type = "invalid_request_error"
    code = "budget_exceeds_window"


class LedgerUnavailableError(ServiceUnavailable):
    """The budget ledger cannot be reached."""

    code = "ledger_unavailable"


class ReloadRefused(InvalidRequest):
    code = "invalid_policy"

    def __init__(self, exc: PolicyError):
        super().__init__(f"reload refused, the previous policy keeps serving: {exc}")


def to_api_error(exc: BackendError | RouteRefusal) -> APIError:
    """The client-facing error for a failure of a layer below the HTTP surface."""
    if isinstance(exc, RouteRefusal):
        return _from_route_refusal(exc)
    return _from_backend_error(exc)


def _from_route_refusal(exc: RouteRefusal) -> APIError:
    if isinstance(exc, AboveMaxTier):
        return InvalidRequest(f"the model '{exc.model}' is above the tier cap '{exc.cap}' set "
                              "by X-Joulegate-Max-Tier", param="model", code="above_max_tier")
    assert isinstance(exc, ModelNotFound)
    return InvalidRequest(f"the model '{exc.model}' does not exist or you may not use it; "
                          "GET /v1/models lists yours", param=exc.param, code="model_not_found")


def _from_backend_error(exc: BackendError) -> APIError:
    if isinstance(exc, ContextWindowExceeded):
        return InvalidRequest(str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, BackendRejected):
        return InvalidRequest(str(exc), param=exc.param, code="rejected_by_backend")
    if isinstance(exc, BackendUnavailable):
        code = "tier_queue_full" if isinstance(exc, TierQueueFull) else None
        headers = {}
        if exc.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
        return ServiceUnavailable(str(exc), code=code, headers=headers)
    if isinstance(exc, BackendTimeout):
        return UpstreamTimeout(str(exc))
    if isinstance(exc, BackendInvalidResponse):
        return UpstreamInvalidResponse(str(exc))
    if isinstance(exc, BackendInvalidOutput):
        return ModelOutputInvalid(str(exc))
    if isinstance(exc, BackendFailure):
        return UpstreamError(str(exc))
    return UpstreamError("the backend failed")


async def api_error_handler(_: Request, exc: Exception) -> Response:
    if isinstance(exc, (BackendError, RouteRefusal)):
        exc = to_api_error(exc)
    assert isinstance(exc, APIError)
    return exc.response()


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError("internal error; see the gateway log", status=500, code="internal_error").response()
