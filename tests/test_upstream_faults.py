"""An upstream that misbehaves: every fault ends in a clear answer, the client's connection
stays usable, and the budget ledger balances.

A real gateway process in front of the fake upstream process (``tests/fake_upstream.py``),
which picks a broken answer per request from the request id the gateway forwards
(``X-Request-Id: fault-<name>.<n>``). Each case asserts what the client sees (a status and
an OpenAI-shaped error, or a stream whose last events are an error event and ``[DONE]``),
that the same keep-alive connection then serves a good request, and that the tenant's
budget shows nothing left reserved and exactly the joules the access log charged.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import (
    ADMIN_KEY,
    KEYS,
    FakeUpstream,
    Gateway,
    access_records,
    priced_policy,
    wait_until,
)
from .fake_upstream import OVERRUN_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.e2e

PRICE = 2.0  # joules per token on tier `big`
TOTAL_S = 2.0  # the upstream's total timeout: a stall ends there
_ids = itertools.count()


@pytest.fixture(scope="module")
def gw(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # A pinned model (`big`) does not fall back to another tier: each fault is seen as is.
    policy = priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": 1_000_000}]})
    for backend in policy["backends"].values():
        backend["timeouts"] = {"first_byte_s": TOTAL_S, "total_s": TOTAL_S}
    # `small` stands for a tier on one of OpenAI's reasoning models.
    policy["backends"]["up-small"]["max_tokens_field"] = "max_completion_tokens"
    work = tmp_path_factory.mktemp("faults")
    policy["state_dir"] = str(work / "state")
    gateway = Gateway(policy, work).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def client(gw: Gateway) -> Iterator[httpx.Client]:
    """One keep-alive connection to the gateway, for the fault and the request after it."""
    with httpx.Client(base_url=gw.url, timeout=30, limits=httpx.Limits(max_connections=1),
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as c:
        yield c


def body(chat: bool, stream: bool, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": "big", "stream": stream, **extra}
    if chat:
        fields["messages"] = [{"role": "user", "content": "Say hello."}]
    else:
        fields["prompt"] = "Say hello."
    return fields


def path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def fault_id(name: str) -> str:
    return f"fault-{name}.{next(_ids)}"


def local_port(response: httpx.Response) -> int:
    """The client's port of the connection ``response`` came on."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for block in map(str.strip, text.split("\n\n")):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def record(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The access log's record of ``request_id`` (waits for it: a stream's record is
    written after its last byte)."""
    def find() -> dict[str, Any] | None:
        return next((r for r in access_records(gw.log()) if r["request_id"] == request_id), None)

    found: dict[str, Any] = wait_until(find, 20, 0.05, f"the access record of {request_id}")
    return found


def window(gw: Gateway) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/admin/tenants/acme/budget", timeout=10,
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    (w,) = r.json()["windows"]
    return dict(w)


def assert_ledger_balanced(gw: Gateway) -> None:
    """Nothing left reserved, and spent = the joules of every request the access log has."""
    charged = sum(r["energy_joules"] for r in access_records(gw.log()) if r["tenant"] == "acme")
    w = window(gw)
    assert w["reserved_joules"] == 0
    assert w["spent_joules"] == pytest.approx(charged, abs=1e-6)


def assert_connection_serves(client: httpx.Client, gw: Gateway, port: int, chat: bool) -> None:
    """The same connection then serves a good request, whose reported joules are charged."""
    rid = f"good.{next(_ids)}"
    r = client.post(path(chat), json=body(chat, False), headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    assert local_port(r) == port  # the connection the fault came on, kept alive
    assert r.json()["usage"]["completion_tokens"] == 12
    assert record(gw, rid)["energy_joules"] == pytest.approx(r.json()["usage"]["energy_joules"])
    assert_ledger_balanced(gw)


# -- before the first byte: a status ------------------------------------------------------

BEFORE_FIRST_BYTE = [
    # (fault, stream, status, code)
    ("usage-string", False, 502, "upstream_invalid_response"),
    ("data-int", False, 502, "upstream_invalid_response"),
    ("data-list", False, 502, "upstream_invalid_response"),
    ("content-int", False, 502, "upstream_invalid_response"),
    ("not-sse", True, 502, "upstream_invalid_response"),
    ("truncated", False, 502, "upstream_error"),
    ("stall", False, 504, "upstream_timeout"),
    ("reset", False, 502, "upstream_error"),
    ("reset-early", False, 502, "upstream_error"),
    ("reset-early", True, 502, "upstream_error"),
]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize(("fault", "stream", "status", "code"), BEFORE_FIRST_BYTE,
                         ids=[f"{f}-{'stream' if s else 'whole'}"
                              for f, s, _, _ in BEFORE_FIRST_BYTE])
def test_a_fault_before_the_first_byte_is_an_error_status(
        gw: Gateway, client: httpx.Client, fault: str, stream: bool, status: int, code: str,
        chat: bool) -> None:
    rid = fault_id(fault)
    r = client.post(path(chat), json=body(chat, stream), headers={"x-request-id": rid})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("api_error", code)
    logged = record(gw, rid)
    assert logged["status"] == status and logged["error"] == code
    assert_connection_serves(client, gw, local_port(r), chat)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_a_connection_that_breaks_before_the_answer_is_tried_once_more(
        gw: Gateway, client: httpx.Client, chat: bool, stream: bool) -> None:
    """The upstream resets the connection before any byte of the answer, once (a kept-alive
    connection it closed just as the gateway reused it): the gateway sends the request again
    on a new connection, the client gets the answer, and it is charged once."""
    extra = {"stream_options": {"include_usage": True}} if stream else {}

    def answer(rid: str) -> tuple[str, dict[str, Any]]:
        r = client.post(path(chat), json=body(chat, stream, **extra),
                        headers={"x-request-id": rid})
        assert r.status_code == 200, r.text
        if not stream:
            choice = r.json()["choices"][0]
            return choice["message"]["content"] if chat else choice["text"], r.json()["usage"]
        got = events(r.text)
        assert got[-1] == "[DONE]"
        text = "".join((e["choices"][0]["delta"].get("content") or "") if chat
                       else e["choices"][0]["text"] for e in got[:-1] if e.get("choices"))
        return text, next(e["usage"] for e in got[:-1] if e.get("usage"))

    rid = fault_id("reset-once")
    text, usage = answer(rid)
    assert text and text == answer(f"good.{next(_ids)}")[0]  # the upstream's whole answer
    logged = record(gw, rid)
    assert logged["status"] == 200
    assert logged["energy_joules"] == pytest.approx(usage["energy_joules"])
    assert_ledger_balanced(gw)


# -- mid-stream: an error event, then [DONE] -------------------------------------------------

MID_STREAM = [
    ("usage-string", "upstream_invalid_response"),
    ("data-int", "upstream_invalid_response"),
    ("data-list", "upstream_invalid_response"),
    ("content-int", "upstream_invalid_response"),
    ("truncated", "upstream_error"),
    ("stall", "upstream_timeout"),
    ("reset", "upstream_error"),
]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize(("fault", "code"), MID_STREAM, ids=[f for f, _ in MID_STREAM])
def test_a_fault_mid_stream_ends_it_with_an_error_event_then_done(
        gw: Gateway, client: httpx.Client, fault: str, code: str, chat: bool) -> None:
    rid = fault_id(fault)
    with client.stream("POST", path(chat), json=body(chat, True),
                       headers={"x-request-id": rid}) as r:
        assert r.status_code == 200  # the first tokens went out before the fault
        text = r.read().decode()
        port = local_port(r)
    got = events(text)
    *relayed, error, done = got
    assert done == "[DONE]"
    assert set(error) == {"error"} and error["error"]["code"] == code
    assert set(error["error"]) == {"message", "type", "param", "code"}
    pieces = "".join((e["choices"][0]["delta"].get("content") or "") if chat
                     else e["choices"][0]["text"] for e in relayed)
    assert pieces == "Hello there"  # the good deltas before the fault, nothing of it
    logged = record(gw, rid)
    assert logged["status"] in (502, 504) and logged["error"] == code
    # The tokens relayed are charged, with the prompt they came from (the upstream never
    # said its size: the gateway's estimate).
    assert logged["completion_tokens"] == 2 and logged["prompt_tokens"] > 0
    assert logged["energy_joules"] == pytest.approx(
        PRICE * (logged["prompt_tokens"] + logged["completion_tokens"]))
    assert_connection_serves(client, gw, port, chat)


# -- an upstream that ignores max_tokens ------------------------------------------------------

def overruns(gw: Gateway) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "joulegate_upstream_overruns_total"
               and s.labels.get("backend") == "up-big")


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_a_stream_past_max_tokens_is_cut_there_and_charged_within_its_reservation(
        gw: Gateway, client: httpx.Client, chat: bool) -> None:
    before = window(gw)["spent_joules"]
    overran = overruns(gw)
    rid = fault_id("ignore-max-tokens")
    request = body(chat, True, max_tokens=5, stream_options={"include_usage": True})
    with client.stream("POST", path(chat), json=request, headers={"x-request-id": rid}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = []
        for line in lines:  # up to the first delta
            received.append(line)
            if "Hello" in line:
                break
        # The upstream sends a token every 100 ms: the stream is open, its joules reserved.
        reserved = window(gw)["reserved_joules"]
        received.extend(lines)
        port = local_port(r)
    assert reserved > 0
    got = events("\n".join(received))
    *relayed, finish, usage_event, done = got
    assert done == "[DONE]" and finish["choices"][0]["finish_reason"] == "length"
    pieces = "".join((e["choices"][0]["delta"].get("content") or "") if chat
                     else e["choices"][0]["text"] for e in relayed)
    assert pieces == "Hello there t0 t1 t2"  # 5 tokens of the 50 the upstream would send
    usage = usage_event["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
    logged = record(gw, rid)
    assert logged["status"] == 200 and logged["error"] == "upstream_overran_max_tokens"
    spent = window(gw)["spent_joules"] - before
    assert spent == pytest.approx(usage["energy_joules"])
    assert spent <= reserved + 1e-6  # never beyond what was reserved for max_tokens
    assert overruns(gw) == overran + 1
    assert_connection_serves(client, gw, port, chat)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_a_whole_answer_past_max_tokens_is_charged_for_max_tokens(
        gw: Gateway, client: httpx.Client, chat: bool) -> None:
    before = window(gw)["spent_joules"]
    overran = overruns(gw)
    rid = fault_id("ignore-max-tokens")
    r = client.post(path(chat), json=body(chat, False, max_tokens=5),
                    headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # The upstream's 50 tokens of text are relayed (a whole answer cannot be cut by tokens
    # here), but only the 5 asked for (and reserved) are charged.
    assert usage["completion_tokens"] == 5 < OVERRUN_TOKENS
    assert usage["prompt_tokens"] == PROMPT_TOKENS
    assert usage["energy_joules"] == pytest.approx(PRICE * (PROMPT_TOKENS + 5))
    assert window(gw)["spent_joules"] - before == pytest.approx(usage["energy_joules"])
    assert record(gw, rid)["error"] == "upstream_overran_max_tokens"
    assert overruns(gw) == overran + 1
    assert_connection_serves(client, gw, local_port(r), chat)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_refuses_max_tokens(client: httpx.Client, stream: bool):
    """OpenAI's reasoning models refuse ``max_tokens`` (400 ``unsupported_parameter``): a
    tier whose backend sends ``max_completion_tokens`` is served, the limit the budget set
    included; one that sends ``max_tokens`` gets a clear 400 that names the upstream's
    reason, not a 500."""
    served = client.post(path(True), json=body(True, stream, model="small"),
                         headers={"x-request-id": fault_id("refuse-max-tokens")})
    assert served.status_code == 200, served.text
    assert served.headers["x-joulegate-tier"] == "small"
    assert "x-joulegate-default-max-tokens" in served.headers  # the budget set a limit
    if stream:
        assert served.text.rstrip().endswith("data: [DONE]")
    else:
        assert served.json()["choices"][0]["message"]["content"]
    refused = client.post(path(True), json=body(True, stream, max_completion_tokens=5),
                          headers={"x-request-id": fault_id("refuse-max-tokens")})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rejected_by_backend"
    assert "max_completion_tokens" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    # A text completion has only max_tokens, on either backend.
    text = client.post(path(False), json=body(False, stream, model="small", max_tokens=5))
    assert text.status_code == 200, text.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize(("fault", "says"), [
    ("context-length", "maximum context length is 8192 tokens. However, your messages "
                       "resulted in 9001 tokens"),
    ("context-size", "maximum context length is 4096 tokens. However, your {what} resulted "
                     "in 5144 tokens")])
def test_a_prompt_too_long_for_the_upstream_is_context_length_exceeded(
        gw: Gateway, client: httpx.Client, fault: str, says: str, chat: bool,
        stream: bool) -> None:
    """OpenAI's and llama-server's answers to too long a prompt reach the client as OpenAI's
    own (400 ``context_length_exceeded``, naming the input), which clients act on; nothing
    is charged."""
    rid = fault_id(fault)
    r = client.post(path(chat), json=body(chat, stream), headers={"x-request-id": rid})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded")
    assert error["param"] == ("messages" if chat else "prompt")
    assert says.format(what="messages" if chat else "prompt") in error["message"]
    assert record(gw, rid)["energy_joules"] == 0
    assert_ledger_balanced(gw)
