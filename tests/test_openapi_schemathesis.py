"""The OpenAPI document against the app (issue 15): schemathesis generates requests from
``/openapi.json`` for every operation, they run in-process (scripted backends, so
generation answers at once), and every response must be no 500, conform to the document
(status, content type, schema), and every 4xx must be an OpenAI error object.

The budget is bounded (``MAX_EXAMPLES`` per operation) so that this stays a unit test."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .inprocess import ADMIN, BASE_URL, InProcessGateway, auth, policy
from .scripted import Script

pytestmark = pytest.mark.unit

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _openai_shaped_4xx(response: httpx.Response) -> None:
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and isinstance(error["type"], str)


def test_every_operation_conforms_to_the_openapi_document(tmp_path):
    loop = asyncio.new_event_loop()
    p = policy({"budgets": [{"window": "1d", "joules": 1e12}]}, server={"openapi": True})
    gw = InProcessGateway(tmp_path, p, {"up-big": Script(tokens=["a", "b"]),
                                        "up-small": Script(tokens=["c"])})
    loop.run_until_complete(gw.__aenter__())
    try:
        doc = loop.run_until_complete(gw.http.get("/openapi.json")).json()
        schema = schemathesis.openapi.from_dict(doc)
        seen: dict[str, set[int]] = {}
        calls: list[str] = []

        def run(case: Any) -> httpx.Response:
            admin = case.path.startswith("/admin")
            key = ADMIN if admin else auth()
            if admin and case.path_parameters and "tenant" in case.path_parameters \
                    and case.path_parameters["tenant"] == "":
                case.path_parameters["tenant"] = "acme"
            calls.append(case.path)
            if isinstance(case.body, dict) and "model" in case.body and len(calls) % 2:
                case.body["model"] = "small"  # every other request names a real tier
            kw = case.as_transport_kwargs(base_url=BASE_URL)
            kw["headers"] = {**{k: v for k, v in (kw.get("headers") or {}).items()
                                if k.lower() != "authorization"}, **key}  # a real key
            # A generated multipart part may be a number or null, which httpx cannot send:
            # send its JSON text, as a form field would carry it.
            files = [(name, (filename, value if isinstance(value, bytes | str)
                             else json.dumps(value)))
                     for name, (filename, value) in kw.get("files") or []] or None
            request = gw.http.build_request(
                kw["method"], kw["url"], headers=kw.get("headers"), params=kw.get("params"),
                json=kw.get("json"), content=kw.get("data"), files=files)
            request.read()  # a multipart body too: the check reads what was sent
            response = loop.run_until_complete(gw.http.send(request))
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)
            _openai_shaped_4xx(response)
            return response

        #: Known-good bodies, so that answers (not only refusals) are checked against the
        #: document too: generated messages often break role rules the schema cannot say.
        valid = {"/v1/chat/completions": {"model": "small", "max_tokens": 3, "messages": [
                     {"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                 "/v1/completions": {"model": "small", "prompt": "Once", "max_tokens": 3}}
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.method.upper() == "POST" and operation.path in valid:
                run(operation.Case(body=valid[operation.path], media_type="application/json"))

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case: Any) -> None:
                run(case)

            check()
        # The Batch API's calls on a real file and batch, so that its answers are checked too.
        ops = {(r.ok().method.upper(), r.ok().path): r.ok() for r in schema.get_all_operations()}
        line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                "body": valid["/v1/chat/completions"]}
        upload = run(ops["POST", "/v1/files"].Case(
            body={"file": json.dumps(line).encode() + b"\n", "purpose": "batch"},
            media_type="multipart/form-data"))
        file_id = upload.json()["id"]
        made = run(ops["POST", "/v1/batches"].Case(
            body={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"}, media_type="application/json"))
        by_id = [("GET", "/v1/files/{file_id}", {"file_id": file_id}),
                 ("GET", "/v1/files/{file_id}/content", {"file_id": file_id}),
                 ("GET", "/v1/batches/{batch_id}", {"batch_id": made.json()["id"]}),
                 ("POST", "/v1/batches/{batch_id}/cancel", {"batch_id": made.json()["id"]}),
                 ("GET", "/v1/models/{model_id}", {"model_id": "small"}),
                 ("DELETE", "/v1/files/{file_id}", {"file_id": file_id})]
        for method, path, parameters in by_id:
            run(ops[method, path].Case(path_parameters=parameters))
        # Calls were answered (not all refused), so the check saw real answers.
        answered = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings",
                    "POST /v1/files", "POST /v1/batches",
                    *(f"{method} {path}" for method, path, _ in by_id)]
        assert all(200 in seen[op] for op in answered), seen
    finally:
        loop.run_until_complete(gw.__aexit__(None, None, None))
        loop.close()
