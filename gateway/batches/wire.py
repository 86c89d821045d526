"""The Batch API's wire formats, as OpenAI defines them: the JSONL input file, the
``batch.create`` body, and the ``file``, ``batch`` and output-line objects.

Input file, one request per line::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output and error files, one line per request::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request the gateway answered goes to the output file when its status is 2xx and to the
error file otherwise, with the answer in ``response`` either way; one that was never
answered (the window expired first) goes to the error file with ``response: null`` and
``error: {"code", "message"}``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import InvalidRequest

#: The endpoints a batch may target.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
#: The one purpose this gateway takes uploads for, and the one of the files it writes.
PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
#: Statuses of a batch that is not finished.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_CUSTOM_ID = 512
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([mhd])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True)
class InputLine:
    custom_id: str
    #: The request body, re-serialised.
    body: bytes


@dataclass(frozen=True)
class BatchInput:
    """A valid batch input file: its one endpoint and its requests in order."""

    endpoint: str
    lines: list[InputLine]


def _bad(message: str, code: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code=code)


def parse_input(data: bytes, max_lines: int) -> BatchInput:
    """The requests of a batch input file, or a 400 naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the file is not UTF-8 text", "invalid_file_encoding") from None
    lines: list[InputLine] = []
    seen: set[str] = set()
    endpoint: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise _bad(f"the file has more than {max_lines} requests, the most one batch "
                       "takes here", "too_many_lines")
        where = f"line {number}"
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _bad(f"{where} is not valid JSON: each line must be one JSON object",
                       "invalid_json_line") from None
        if not isinstance(line, dict):
            raise _bad(f"{where} is not a JSON object", "invalid_json_line")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _bad(f"{where} has no 'custom_id' (a non-empty string)", "missing_custom_id")
        if len(custom_id) > MAX_CUSTOM_ID:
            raise _bad(f"{where}: 'custom_id' is longer than {MAX_CUSTOM_ID} characters",
                       "invalid_custom_id")
        if custom_id in seen:
            raise _bad(f"{where}: the custom_id '{custom_id}' is used by an earlier line; each "
                       "request needs its own", "duplicate_custom_id")
        seen.add(custom_id)
        if line.get("method") != "POST":
            raise _bad(f"{where}: 'method' must be 'POST'", "invalid_method")
        url = line.get("url")
        if url not in ENDPOINTS:
            raise _bad(f"{where}: 'url' must be one of {', '.join(ENDPOINTS)}, got {url!r}",
                       "invalid_url")
        if endpoint is None:
            endpoint = url
        elif url != endpoint:
            raise _bad(f"{where}: 'url' is {url} but earlier lines use {endpoint}; one batch "
                       "calls one endpoint", "mismatched_url")
        body = line.get("body")
        if not isinstance(body, dict):
            raise _bad(f"{where}: 'body' must be a JSON object (the request)", "invalid_body")
        if body.get("stream") is True:
            raise _bad(f"{where}: 'stream' is not supported in a batch", "invalid_body")
        lines.append(InputLine(custom_id, orjson.dumps(body)))
    if endpoint is None:
        raise _bad("the file holds no request", "empty_file")
    return BatchInput(endpoint, lines)


def window_seconds(window: object, max_s: float) -> int:
    """``completion_window`` ("24h", "90m", "2d") in seconds, or a 400."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not match or not 60 <= seconds <= max_s:
        raise InvalidRequest(f"'completion_window' must be a duration such as '24h' (minutes "
                             f"'m', hours 'h' or days 'd'), from 1m to {int(max_s)} s",
                             param="completion_window", code="invalid_completion_window")
    return seconds


@dataclass(frozen=True)
class CreateBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    #: Seconds the output and error files are kept after they are written (None: kept).
    output_expires_s: int | None = None


_CREATE_KEYS = {"input_file_id", "endpoint", "completion_window", "metadata",
                "output_expires_after"}


def parse_create(body: object) -> CreateBatch:
    """The ``POST /v1/batches`` body, or a 400."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - _CREATE_KEYS)
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0],
                             code="unknown_parameter")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("'input_file_id' is required: the id of a file uploaded with "
                             "purpose 'batch'", param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}",
                             param="endpoint", code="invalid_endpoint")
    window = body.get("completion_window")
    if not isinstance(window, str):
        raise InvalidRequest("'completion_window' is required, e.g. '24h'",
                             param="completion_window")
    return CreateBatch(file_id, endpoint, window, check_metadata(body.get("metadata")),
                       expires_after(body.get("output_expires_after"), "output_expires_after"))


def expires_after(given: object, param: str) -> int | None:
    """``{"anchor": "created_at", "seconds": n}`` (an hour to 30 days) as seconds."""
    if given is None:
        return None
    seconds = given.get("seconds") if isinstance(given, dict) else None
    if not isinstance(given, dict) or given.get("anchor") != "created_at" \
            or not isinstance(seconds, int) or isinstance(seconds, bool) \
            or not 3600 <= seconds <= 30 * 86400:
        raise InvalidRequest(f"'{param}' takes anchor 'created_at' and seconds from 3600 to "
                             "2592000", param=param)
    return seconds


def check_metadata(meta: object) -> dict[str, str] | None:
    if meta is None:
        return None
    if (not isinstance(meta, dict) or len(meta) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                       and len(v) <= 512 for k, v in meta.items())):
        raise InvalidRequest("'metadata' takes at most 16 pairs of strings, keys of at most 64 "
                             "characters and values of at most 512", param="metadata",
                             code="invalid_metadata")
    return dict(meta)


# -- objects --------------------------------------------------------------------------------

def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``file`` object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed",
            "expires_at": row["expires_at"], "status_details": None}


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def output_line(line_id: str, custom_id: str, status: int, request_id: str,
                body: object) -> dict[str, Any]:
    """A line of the output (2xx) or error file for a request the gateway answered."""
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None}


def error_line(line_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line of the error file for a request that was never answered."""
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
