"""Logs an operator can ship: JSON or text, one access record per request, request ids
accepted, returned and forwarded upstream."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gateway.logs import JSONFormatter, TextFormatter, log_config

from .conftest import KEYS, Gateway, access_records, priced_policy

HI = [{"role": "user", "content": "Say hello in one short sentence."}]


def _record(**access) -> logging.LogRecord:
    record = logging.LogRecord("joulegate.access", logging.INFO, __file__, 1, "request", None,
                               None)
    record.access = access
    return record


@pytest.mark.unit
def test_json_format_is_one_object_per_line_with_every_field():
    line = JSONFormatter().format(_record(request_id="r1", tenant="acme", status=200,
                                          rejected_params=["tools"]))
    record = json.loads(line)
    assert "\n" not in line
    assert record["logger"] == "joulegate.access" and record["level"] == "INFO"
    assert record["message"] == "request" and record["time"].endswith("Z")
    assert (record["request_id"], record["tenant"], record["status"]) == ("r1", "acme", 200)
    assert record["rejected_params"] == ["tools"]


@pytest.mark.unit
def test_text_format_is_readable_and_skips_empty_fields():
    line = TextFormatter().format(_record(request_id="r1", tenant="acme", error=None,
                                          dropped_params=[], fallback_from=["big", "mid"],
                                          model="my model"))
    assert " INFO joulegate.access request request_id=r1 tenant=acme" in line
    assert "fallback_from=big,mid" in line and 'model="my model"' in line
    assert "error=" not in line and "dropped_params" not in line


@pytest.mark.unit
def test_log_config_applies_one_format_to_uvicorn_and_joulegate():
    config = log_config("info", "json")
    assert config["formatters"]["default"]["()"] == "gateway.logs.JSONFormatter"
    for name in ("joulegate", "uvicorn", "uvicorn.error"):
        assert config["loggers"][name]["handlers"] == ["default"]
    assert config["loggers"]["uvicorn.access"]["handlers"] == []  # joulegate's record instead
    assert log_config("info", "text")["formatters"]["default"]["()"] == "gateway.logs.TextFormatter"


class RecordingUpstream:
    """An OpenAI-compatible upstream that answers one fixed completion and keeps the
    headers and bodies of every request it gets."""

    def __init__(self) -> None:
        seen = self.headers = []
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's name for it
                bodies.append(json.loads(self.rfile.read(int(self.headers.get("content-length", 0)))))
                seen.append(dict(self.headers))
                body = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.e2e
def test_access_log_records_and_request_ids(gateways):
    upstream = RecordingUpstream()
    try:
        gw: Gateway = gateways(priced_policy(upstream.url, {}))
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        ok = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                        headers={**auth, "x-request-id": "trace-123"},
                        json={"model": "big", "max_tokens": 5, "store": True,
                              "messages": [{"role": "user", "content": "hi", "name": "ann"}]})
        assert ok.status_code == 200
        assert ok.headers["x-request-id"] == "trace-123"
        assert ok.headers["x-joulegate-dropped-params"] == "store"
        assert upstream.headers[-1].get("x-request-id") == "trace-123"  # forwarded upstream
        assert upstream.bodies[-1]["messages"][0]["name"] == "ann"  # an HTTP upstream gets it
        assert "store" not in upstream.bodies[-1]

        refused = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers=auth,
                             json={"model": "big", "messages": HI, "tools": [],
                                   "frobnicate": {}})
        assert refused.status_code == 400
        own_id = refused.headers["x-request-id"]  # made by the gateway when not given

        records = access_records(gw.log())
        served = next(r for r in records if r["request_id"] == "trace-123")
        assert served["tenant"] == "acme" and served["model"] == "big"
        assert served["tier"] == "big" and served["status"] == 200
        assert (served["prompt_tokens"], served["completion_tokens"]) == (12, 1)
        assert served["energy_joules"] == pytest.approx(26.0)  # 13 tokens x 2 J
        assert served["energy_source"] == "estimated" and served["latency_s"] > 0
        assert served["dropped_params"] == ["store"]
        bad = next(r for r in records if r["status"] == 400)
        assert sorted(bad["rejected_params"]) == ["frobnicate", "tools"]
        assert bad["request_id"] == own_id
        text = gw.log()
        assert KEYS["acme"] not in text and "Say hello" not in text  # never keys or prompts
    finally:
        upstream.stop()
