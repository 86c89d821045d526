"""The HTTP side of the Batch API: ``/v1/files`` and ``/v1/batches``, as OpenAI's.

    POST   /v1/files                  multipart upload (``file``, ``purpose: batch``)
    GET    /v1/files                  list (``purpose``, ``limit``, ``order``, ``after``)
    GET    /v1/files/{id}             the file object
    GET    /v1/files/{id}/content     the file's bytes
    DELETE /v1/files/{id}
    POST   /v1/batches                create (``input_file_id``, ``endpoint``,
                                      ``completion_window``, ``metadata``)
    GET    /v1/batches                list (``after``, ``limit``), newest first
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

Files and batches belong to the tenant whose key created them; another tenant's id is a
404. A batch input file is checked when it is uploaded (one endpoint, unique
``custom_id``s, at most ``batches.max_lines`` requests): a bad one is a 400 naming the line.

The batch object is OpenAI's, with one more field, ``carbon``: where and when it runs
(``site``, ``source``, ``scheduled_at``, ``started_at``) and what its finished requests
spent (``energy_joules``, ``facility_joules``, ``co2_g``) against running at once
(``co2_g_if_immediate``, ``co2_g_avoided``). The SDK keeps it (``batch.model_extra``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message

from ..auth import authenticate
from ..errors import APIError, BodyTooLarge, InvalidRequest, NotFound
from ..steps import read_body
from . import wire
from .clock import unix
from .plan import batch_site, schedule
from .store import BatchRow, FileRow

if TYPE_CHECKING:
    from .scheduler import BatchService

#: Multipart framing and the form's small fields, beside the file itself.
_FORM_OVERHEAD = 64 * 1024


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _service(request: Request) -> BatchService:
    service: BatchService | None = getattr(request.app.state, "batches", None)
    if service is None:
        raise APIError("the Batch API is not running", status=503, code="service_unavailable")
    return service


def _tenant(request: Request) -> str:
    snap = request.app.state.runtime.current
    return authenticate(snap.tenant_keys, request.headers.get("authorization"))


def _limit(request: Request, default: int, most: int) -> int:
    given = request.query_params.get("limit")
    if given is None:
        return default
    if not given.isdigit() or not 1 <= int(given) <= most:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {most}", param="limit")
    return int(given)


def _file_missing(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")


def _batch_missing(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", param="batch_id",
                    code="batch_not_found")


# -- files ------------------------------------------------------------------------------------

async def files(request: Request) -> Response:
    if request.method == "POST":
        return await _upload(request)
    tenant, service = _tenant(request), _service(request)
    purpose = request.query_params.get("purpose")
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    rows, more = await service.store.call(
        service.store.list_files, tenant, purpose, _limit(request, 10_000, 10_000),
        order == "desc", request.query_params.get("after"))
    return _json(wire.list_object([wire.file_object(r.as_dict()) for r in rows], more))


async def _upload(request: Request) -> Response:
    tenant, service = _tenant(request), _service(request)
    spec = service.spec
    limit = spec.max_file_bytes + _FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the upload of {declared} bytes exceeds the limit of "
                           f"{spec.max_file_bytes} bytes per file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data with the fields 'file' and "
                             "'purpose'", param="file", code="invalid_content_type")
    form = await _LimitedRequest(request, limit).form(max_files=1, max_fields=8)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != wire.PURPOSE:
            raise InvalidRequest(f"'purpose' must be '{wire.PURPOSE}': this gateway keeps files "
                                 "for the Batch API only", param="purpose",
                                 code="invalid_purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("'file' is required: the JSONL file of requests", param="file")
        data = await upload.read()
        filename = (upload.filename or "upload.jsonl")[:255]
    finally:
        await form.close()
    if len(data) > spec.max_file_bytes:
        raise BodyTooLarge(f"the file of {len(data)} bytes exceeds the limit of "
                           f"{spec.max_file_bytes} bytes")
    parsed = wire.parse_input(data, spec.max_lines)
    created = unix(service.clock.now())
    seconds = form.get("expires_after[seconds]")
    expires = wire.expires_after(
        None if form.get("expires_after[anchor]") is None and seconds is None else
        {"anchor": form.get("expires_after[anchor]"),
         "seconds": int(seconds) if isinstance(seconds, str) and seconds.isdigit() else seconds},
        "expires_after")
    row = FileRow(wire.new_id("file-"), tenant, wire.PURPOSE, filename, len(data), created,
                  None if expires is None else created + expires, parsed.endpoint)
    await service.store.call(service.store.put_file, row, data)
    return _json(wire.file_object(row.as_dict()))


class _LimitedRequest(Request):
    """``request`` whose body stream refuses with 413 past ``limit`` bytes (the multipart
    parser reads the upload through it, spooling the file to disk)."""

    def __init__(self, request: Request, limit: int):
        seen = 0
        receive = request.receive

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"the upload exceeds the limit of {limit} bytes")
            return message

        super().__init__(request.scope, limited)


async def file(request: Request) -> Response:
    tenant, service = _tenant(request), _service(request)
    file_id = request.path_params["file_id"]
    if request.method == "DELETE":
        if not await service.store.call(service.store.delete_file, tenant, file_id):
            raise _file_missing(file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})
    row = await service.store.call(service.store.get_file, tenant, file_id)
    if row is None:
        raise _file_missing(file_id)
    return _json(wire.file_object(row.as_dict()))


async def file_content(request: Request) -> Response:
    tenant, service = _tenant(request), _service(request)
    file_id = request.path_params["file_id"]
    content = await service.store.call(service.store.file_content, tenant, file_id)
    if content is None:
        raise _file_missing(file_id)
    return Response(content, media_type="application/octet-stream")


# -- batches ----------------------------------------------------------------------------------

async def batches(request: Request) -> Response:
    tenant, service = _tenant(request), _service(request)
    if request.method == "GET":
        rows, more = await service.store.call(service.store.list_batches, tenant,
                                              request.query_params.get("after"),
                                              _limit(request, 20, 100))
        return _json(wire.list_object([await batch_object(service, r) for r in rows], more))
    snap = request.app.state.runtime.current
    raw = await read_body(request, snap.policy.server.max_body_bytes,
                          snap.policy.server.limits.body_read_timeout_s)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    create = wire.parse_create(body)
    spec = service.spec
    window_s = wire.window_seconds(create.completion_window, spec.max_window_s)
    source = await service.store.call(service.store.get_file, tenant, create.input_file_id)
    if source is None:
        raise _file_missing(create.input_file_id, "input_file_id")
    if source.purpose != wire.PURPOSE:
        raise InvalidRequest(f"the file {source.id} has purpose '{source.purpose}'; a batch "
                             f"reads a file uploaded with purpose '{wire.PURPOSE}'",
                             param="input_file_id", code="invalid_input_file")
    if source.endpoint != create.endpoint:
        raise InvalidRequest(f"the file's requests call {source.endpoint}, but the batch's "
                             f"endpoint is {create.endpoint}", param="endpoint",
                             code="endpoint_mismatch")
    content = await service.store.call(service.store.file_content, tenant, source.id)
    if content is None:  # deleted meanwhile
        raise _file_missing(create.input_file_id, "input_file_id")
    parsed = wire.parse_input(content, spec.max_lines)
    now = service.clock.now()
    bodies = [line.body for line in parsed.lines]
    plan = schedule(batch_site(snap, tenant, bodies), now, window_s, len(bodies),
                    spec.concurrency, spec.line_seconds).as_dict()
    plan["started_at"] = None
    plan["output_expires_s"] = create.output_expires_s
    models = {orjson.loads(b).get("model") for b in bodies}
    doc: dict[str, Any] = {
        "id": wire.new_id("batch_"), "object": "batch", "endpoint": create.endpoint,
        "model": models.pop() if len(models) == 1 else None, "errors": None,
        "input_file_id": source.id, "completion_window": create.completion_window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": unix(now), "in_progress_at": None, "expires_at": int(plan["expires_at"]),
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None, "metadata": create.metadata}
    await service.store.call(service.store.create_batch, tenant, doc, plan,
                             [(line.custom_id, line.body) for line in parsed.lines])
    service.wake()
    row = BatchRow(doc["id"], tenant, doc["status"], doc, plan)
    return _json(await batch_object(service, row))


async def _own_batch(request: Request) -> tuple[BatchService, BatchRow]:
    """The service and the batch named in the path, of the caller's tenant (404 if not)."""
    tenant, service = _tenant(request), _service(request)
    batch_id = request.path_params["batch_id"]
    row = await service.store.call(service.store.get_batch, tenant, batch_id)
    if row is None:
        raise _batch_missing(batch_id)
    return service, row


async def batch(request: Request) -> Response:
    service, row = await _own_batch(request)
    return _json(await batch_object(service, row))


async def cancel(request: Request) -> Response:
    service, row = await _own_batch(request)
    if row.status in ("validating", "in_progress"):
        updated = await service.store.call(
            service.store.update_batch, row.id,
            {"status": "cancelling", "cancelling_at": unix(service.clock.now())},
            ("validating", "in_progress"))
        again = updated or await service.store.call(service.store.get_batch, row.tenant, row.id)
        assert again is not None
        row = again
        service.halt(row.id)
    elif row.status != "cancelling" and row.status != "cancelled":
        raise InvalidRequest(f"the batch is {row.status}: only a batch that is validating or "
                             "in progress can be cancelled", param="batch_id",
                             code="batch_not_cancellable")
    return _json(await batch_object(service, row))


async def batch_object(service: BatchService, row: BatchRow) -> dict[str, Any]:
    """The batch's OpenAI object (with ``carbon``), its counts and usage from its lines."""
    t = await service.store.call(service.store.totals, row.id)
    plan = row.plan
    obj = dict(row.doc)
    obj["request_counts"] = {"total": t.total, "completed": t.completed, "failed": t.failed}
    obj["usage"] = {"input_tokens": t.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": t.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": t.prompt_tokens + t.completion_tokens}
    obj["carbon"] = {
        "site": plan["site"], "source": plan["source"],
        "scheduled_at": int(plan["scheduled_at"]), "started_at": plan.get("started_at"),
        "g_per_kwh_at_submit": plan.get("g_per_kwh_at_submit"),
        "g_per_kwh_at_start": plan.get("g_per_kwh_at_start"),
        "energy_joules": round(t.energy_joules, 6),
        "facility_joules": round(t.facility_joules, 6), "co2_g": round(t.co2_g, 6),
        "co2_g_if_immediate": round(t.co2_g_if_immediate, 6),
        "co2_g_avoided": round(t.co2_g_if_immediate - t.co2_g, 6)}
    return obj


def routes() -> list[BaseRoute]:
    """The Batch API's routes (the app keeps its service in ``app.state.batches``)."""
    return [
        Route("/v1/files", files, methods=["GET", "POST"]),
        Route("/v1/files/{file_id}", file, methods=["GET", "DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", batches, methods=["GET", "POST"]),
        Route("/v1/batches/{batch_id}", batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel, methods=["POST"]),
    ]
