"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see is an :class:`APIError`; backend failures are translated
by :func:`from_backend_error`. Nothing else reaches the client: unexpected exceptions
become a generic 500 with no stack trace (the trace goes to the log).
"""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends.base import (
    BackendError,
    BackendFailure,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

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

    def body(self) -> dict:
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


class ServiceUnavailable(APIError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamTimeout(APIError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


def from_backend_error(exc: BackendError) -> APIError:
    """The client-facing error for a backend failure."""
    if isinstance(exc, BackendRejected):
        return InvalidRequest(str(exc), param=exc.param, code="rejected_by_backend")
    if isinstance(exc, BackendUnavailable):
        headers = {}
        if exc.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
        return ServiceUnavailable(str(exc), headers=headers)
    if isinstance(exc, BackendTimeout):
        return UpstreamTimeout(str(exc))
    if isinstance(exc, BackendFailure):
        return UpstreamError(str(exc))
    return UpstreamError("the backend failed")


async def api_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError("internal error; see the gateway log", status=500, code="internal_error").response()
