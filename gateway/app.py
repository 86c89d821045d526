"""The HTTP surface: routes, lifespan, error handlers. Logic lives in the modules it calls.

``create_app(policy_path)`` returns a FastAPI app whose lifespan loads the policy, starts
the backends, and reloads on SIGHUP. All state hangs off ``app.state.runtime``; there is
no module-level mutable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route

from policies import DEFAULT_POLICY_PATH, PolicyError, TenantSpec
from policies.schema import LimitsSpec, resolve_key_ref

from . import pipeline
from .auth import KeyIndex, authenticate
from .batches import BatchService
from .batches import routes as batch_routes
from .budgets import Ledger, LedgerUnavailable
from .budgets.guard import BudgetGuard
from .capabilities import model_objects
from .embeddings import handle_embeddings
from .errors import (
    APIError,
    AuthenticationError,
    InvalidRequest,
    LedgerUnavailableError,
    NotFound,
    ReloadRefused,
    ServiceUnavailable,
    api_error_handler,
    unexpected_error_handler,
)
from .limits import HeaderLimits
from .openapi import openapi_spec
from .responses import handle_responses
from .runtime import Runtime
from .sustainability import in_unit

if TYPE_CHECKING:
    from backends import Backend
    from policies.schema import BackendSpec

log = logging.getLogger("joulegate")

#: How `joulegate serve --workers N` tells each worker process which policy to load.
POLICY_ENV = "JOULEGATE_POLICY"


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def otel_telemetry(providers: tuple[object, object, object] | None = None,
                   environ: Mapping[str, str] = os.environ) -> TelemetryConfig:
    """FastAPI's OpenTelemetry switches (traces, metrics, logs), each on only where the
    process has configured that provider by the time the app is made (say, under
    ``opentelemetry-instrument joulegate serve``), or all left to FastAPI where it is told
    to configure them itself (``FASTAPI_OTEL_AUTO_CONFIGURE=true``). Left to itself FastAPI
    asks the three global providers on every request whether they are configured yet;
    unconfigured, the usual case, that cost every request ~15 µs for nothing.
    ``providers``: the (tracer, meter, logger) providers to judge (default: the global ones)."""
    if environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return TelemetryConfig()
    if providers is None:
        from opentelemetry import _logs, metrics, trace  # fastapi depends on the API

        providers = (trace.get_tracer_provider(), metrics.get_meter_provider(),
                     _logs.get_logger_provider())

    def configured(provider: object) -> bool:
        # The API's stand-ins until a provider is set are all named *Proxy*Provider.
        return "Proxy" not in type(provider).__name__

    tracer, meter, logger = providers
    return TelemetryConfig(tracing=configured(tracer), metrics=configured(meter),
                           logs=configured(logger))


def create_app(policy_path: str | Path | None = None,
               build_backend: Callable[[str, BackendSpec], Backend] | None = None, *,
               freeze_startup_heap: bool = False) -> FastAPI:
    """The gateway application for ``policy_path`` (default: ``$JOULEGATE_POLICY`` or the
    embedded default policy). ``build_backend`` replaces how backends are built from
    their policy entries (see :class:`Runtime`). ``freeze_startup_heap`` (a server process
    of its own: ``joulegate serve``) ends the start-up with :func:`gc.freeze`: what start-up
    made (modules, the policy, estimators, models) lives as long as the process, and the
    cyclic collector then stops walking it at every full collection. Under load one ran every
    ~1.2 s and took ~55 ms (the p99 at concurrency 32); frozen, ~4 ms."""
    path = Path(policy_path or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_PATH)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(path, build_backend=build_backend)
        await runtime.start()
        app.state.runtime = runtime
        batches = app.state.batches = BatchService(runtime, app).start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            task = loop.create_task(_reload_logged(runtime))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        saver = runtime.supervise("calibration_saver", lambda: _save_calibration(runtime))
        snap = runtime.current
        log.info("joulegate serving policy %s: tiers %s", path, ", ".join(snap.tiers))
        if freeze_startup_heap:
            gc.freeze()
        try:
            yield
        finally:
            await batches.close()  # first: its requests in flight finish through the app
            await saver.close()  # (runtime.close() closes every other background loop)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            await _settle_open_streams(app)
            await runtime.close()

    app = FastAPI(title="joulegate", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry=otel_telemetry())
    #: Streams in progress (streaming.SSEResponse): shutdown waits for their cleanup.
    app.state.open_streams = set()
    app.add_middleware(HeaderLimits, limits=lambda: _header_limits(app))
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)

    # The two hot endpoints are plain Starlette routes: they read the raw request, so
    # FastAPI's per-request dependency solving would be pure overhead (~6% of CPU).
    async def chat_completions(request: Request) -> Response:
        return await pipeline.handle_generation(request.app.state.runtime, request, chat=True)

    async def completions(request: Request) -> Response:
        return await pipeline.handle_generation(request.app.state.runtime, request, chat=False)

    app.router.routes.append(Route("/v1/chat/completions", chat_completions, methods=["POST"]))
    app.router.routes.append(Route("/v1/completions", completions, methods=["POST"]))

    async def embeddings(request: Request) -> Response:
        return await handle_embeddings(request.app.state.runtime, request)

    app.router.routes.append(Route("/v1/embeddings", embeddings, methods=["POST"]))

    async def responses(request: Request) -> Response:
        return await handle_responses(request.app.state.runtime, request)

    app.router.routes.append(Route("/v1/responses", responses, methods=["POST"]))
    app.router.routes.extend(batch_routes())  # /v1/files, /v1/batches

    @app.get("/openapi.json")
    async def openapi_document(request: Request) -> Response:
        if not request.app.state.runtime.current.policy.server.openapi:
            raise NotFound("no such endpoint")
        return _json(openapi_spec(app))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        snap = request.app.state.runtime.current
        tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        return _json({"object": "list", "data": model_objects(snap.policy, tenant)})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        snap = request.app.state.runtime.current
        tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        for obj in model_objects(snap.policy, tenant):
            if obj["id"] == model_id:
                return _json(obj)
        raise NotFound(f"the model '{model_id}' does not exist or you may not use it; "
                       "GET /v1/models lists yours", param="model", code="model_not_found")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        _metrics_auth(runtime, request.headers.get("authorization"), required=True)
        runtime.metrics.record_backend_load(runtime.current.backends)
        body, content_type = runtime.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        snap = request.app.state.runtime.current
        health = await Runtime.probe(snap)
        ready = all(h.ok for h in health.values())
        if not _metrics_auth(request.app.state.runtime, request.headers.get("authorization"),
                             required=False):  # the status code only, not the details
            return _json({"status": "ready" if ready else "not ready"},
                         status=200 if ready else 503)
        return _json({"status": "ready" if ready else "not ready", "policy_version": snap.version,
                      "backends": {n: {"ok": h.ok, "detail": h.detail, **h.info}
                                   for n, h in health.items()}},
                     status=200 if ready else 503)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        _admin(runtime, request)
        try:
            snap = await runtime.reload()
        except PolicyError as exc:
            raise ReloadRefused(exc) from None
        return _json({"status": "reloaded", "policy_version": snap.version})

    @app.get("/admin/tenants/{tenant}/budget")
    async def budget_show(tenant: str, request: Request) -> Response:
        ledger, spec = _admin_tenant(request, tenant)
        states = await _ledger(ledger.status(tenant, BudgetGuard.limits(spec)))
        return _json({"tenant": tenant, "windows": [
            {"window": s.window, "period_start": s.period_start, "period_end": s.period_end,
             "limit_joules": s.limit, "granted_joules": s.granted, "spent_joules": s.spent,
             "reserved_joules": s.reserved, "remaining_joules": s.remaining,
             **in_unit(s)} for s in states]})

    @app.post("/admin/tenants/{tenant}/budget/reset")
    async def budget_reset(tenant: str, request: Request) -> Response:
        ledger, spec = _admin_tenant(request, tenant)
        body = await _admin_body(request)
        # Explicit only: {"window": "1h"} or {"all": true}; an empty or unknown window is a
        # 400, never "reset everything".
        given: list[object]
        if body.get("all") is True and "window" not in body:
            given = [b.window for b in spec.budgets]
        elif "window" in body and "all" not in body:
            given = [body["window"]]
        else:
            raise InvalidRequest("give 'window' (one of this tenant's budget windows: "
                                 f"{', '.join(b.window for b in spec.budgets) or 'none'}) "
                                 "or 'all': true", param="window")
        windows = _known_windows(spec, given)
        await _ledger(ledger.reset(tenant, windows))
        return _json({"tenant": tenant, "reset": windows})

    @app.post("/admin/tenants/{tenant}/budget/grant")
    async def budget_grant(tenant: str, request: Request) -> Response:
        ledger, spec = _admin_tenant(request, tenant)
        body = await _admin_body(request)
        [window], joules = _known_windows(spec, [body.get("window")]), body.get("joules")
        if not isinstance(joules, (int, float)) or isinstance(joules, bool) or joules <= 0:
            raise InvalidRequest("'joules' must be a positive number", param="joules")
        await _ledger(ledger.grant(tenant, window, float(joules)))
        return _json({"tenant": tenant, "window": window, "granted_joules": joules})

    return app


def _header_limits(app: FastAPI) -> tuple[int, int]:
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    limits = (runtime.current.policy.server.limits if runtime is not None
              else LimitsSpec())
    return limits.max_header_count, limits.max_header_bytes


def _metrics_auth(runtime: Runtime, authorization: str | None, required: bool) -> bool:
    """Whether the caller may see metrics and details: always when the policy sets no
    ``server.metrics_token``; else only with it (``required``: 401 without it)."""
    ref = runtime.current.policy.server.metrics_token
    if ref is None:
        return True
    try:
        digest = resolve_key_ref(ref)
    except KeyError:
        log.warning("server.metrics_token names an unset variable: metrics are refused")
        digest = "00" * 32
    try:
        authenticate(KeyIndex([(digest, "metrics")]), authorization)
    except AuthenticationError:
        if required:
            raise
        return False
    return True


async def _settle_open_streams(app: FastAPI, timeout_s: float = 5.0) -> None:
    """Wait (bounded) for streams still finishing, so that their joules settle before the
    backends and the ledger close."""
    streams = set(getattr(app.state, "open_streams", ()))
    if streams:
        await asyncio.wait(streams, timeout=timeout_s)


def _admin_tenant(request: Request, tenant: str) -> tuple[Ledger, TenantSpec]:
    """The budget ledger and the tenant's policy entry, for an admin's budget request."""
    runtime: Runtime = request.app.state.runtime
    _admin(runtime, request)
    spec = runtime.current.policy.tenants.get(tenant)
    if spec is None:
        raise NotFound(f"no tenant '{tenant}' in the policy")
    if runtime.budgets is None:  # set when the runtime starts, before the app serves
        raise ServiceUnavailable("the gateway is still starting")
    return runtime.budgets.ledger, spec


async def _admin_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def _known_windows(spec: TenantSpec, given: list[object]) -> list[str]:
    """``given`` (from a request body), each one of the tenant's budget windows."""
    known: list[str] = [b.window for b in spec.budgets]
    windows: list[str] = []
    for window in given:
        if not isinstance(window, str) or window not in known:
            raise InvalidRequest(f"'window' must be one of this tenant's budget windows "
                                 f"({', '.join(known) or 'none'})", param="window")
        windows.append(window)
    return windows


_T = TypeVar("_T")


async def _ledger(operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except LedgerUnavailable as exc:
        raise LedgerUnavailableError(f"the budget ledger is unavailable ({exc})") from None


def _admin(runtime: Runtime, request: Request) -> None:
    snap = runtime.current
    if len(snap.admin_keys) == 0:
        raise NotFound("not found")  # admin API disabled: no admin keys in the policy
    authenticate(snap.admin_keys, request.headers.get("authorization"))


async def _save_calibration(runtime: Runtime, every_s: float = 30.0) -> None:
    """Persist the calibration table while it changes (and once more at shutdown); runs
    supervised (:meth:`Runtime.supervise`)."""
    while True:
        await asyncio.sleep(every_s)
        if runtime.calibration.dirty:
            try:
                await asyncio.to_thread(runtime.calibration.save)
            except OSError as exc:
                log.warning("cannot save the calibration table: %s", exc)


async def _reload_logged(runtime: Runtime) -> None:
    try:
        await runtime.reload()
    except PolicyError as exc:
        log.error("SIGHUP reload refused, the previous policy keeps serving: %s", exc)
    except Exception:  # a reload must never take the gateway down (logged with its trace)
        log.exception("SIGHUP reload failed, the previous policy keeps serving")


async def _http_exception_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return NotFound("no such endpoint").response()
    if exc.status_code == 405:
        return APIError("method not allowed on this endpoint", status=405,
                        code="method_not_allowed").response()
    return APIError(str(exc.detail), status=exc.status_code).response()


def create_served_app() -> FastAPI:
    """The app of a ``joulegate serve --workers N`` worker process (uvicorn's factory): the
    policy from ``$JOULEGATE_POLICY``, the start-up heap frozen (see :func:`create_app`)."""
    return create_app(freeze_startup_heap=True)
