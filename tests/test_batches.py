"""The Batch API in-process: the real app with scripted backends, the official SDK over
ASGI, and a manual clock for the batch scheduler (no sleeps: the test moves time and
waits for the scheduler to settle).

Covered: a batch's life (validating → in_progress → completed; cancelling → cancelled;
expired), its output and error files in OpenAI's line format, request counts and usage,
the deferral to the cleanest hour of a site's schedule (nothing runs before it), the CO₂
figures against running at once (checked by hand), budgets charged per request, tenant
isolation, and a restart with a batch waiting.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import openai
import pytest

from gateway.batches import ManualClock
from gateway.sustainability import J_PER_KWH
from gateway.usage_log import read_usage

from .inprocess import ADMIN, InProcessGateway, auth, policy

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

T0 = datetime(2026, 3, 2, 0, 30, tzinfo=UTC)
#: The grid of the test site: 400 g/kWh until 03:00, 100 in hour 3, 300 from 04:00.
SCHEDULE = {0: 400.0, 3: 100.0, 4: 300.0}
PUE = 1.5
#: A scripted request on tier big: 10 prompt + 4 completion tokens at 2 J each.
LINE_JOULES = 28.0


def chat_line(custom_id: str, model: str = "big", content: str = "hello") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def site_policy(**batches) -> dict:
    """The in-process policy with backend up-big at a site with a daily carbon schedule."""
    p = policy()
    p["sites"] = {"grid": {"pue": PUE, "carbon": {"schedule": SCHEDULE}}}
    p["backends"]["up-big"]["site"] = "grid"
    if batches:
        p["batches"] = batches
    return p


class Batches:
    """A gateway in-process with a manual batch clock, and the SDK on it."""

    def __init__(self, gw: InProcessGateway, clock: ManualClock):
        self.gw, self.clock = gw, clock
        self.sdk = gw.openai()
        self.service = gw.app.state.batches

    async def upload(self, lines: list[dict], who: str = "acme"):
        sdk = self.sdk if who == "acme" else self.gw.openai(who)
        return await sdk.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")

    async def submit(self, lines: list[dict], window: str = "24h", **kw):
        f = await self.upload(lines)
        return await self.sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                             completion_window=window, **kw)

    async def at(self, when: datetime):
        """Move the clock to ``when`` and let the scheduler do all it can by then."""
        self.clock.set(when)
        await self.service.settle()

    async def lines(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        content = await self.sdk.files.content(file_id)
        return [json.loads(line) for line in content.text.splitlines()]


def batches_gateway(tmp_path, policy_dict: dict | None = None, **kw):
    class Ctx:
        async def __aenter__(self):
            self.gw = InProcessGateway(tmp_path, policy_dict or site_policy(), **kw)
            await self.gw.__aenter__()
            clock = ManualClock(T0)
            self.gw.app.state.batches.use_clock(clock)
            return Batches(self.gw, clock)

        async def __aexit__(self, *exc):
            await self.gw.__aexit__(*exc)

    return Ctx()


# -- files --------------------------------------------------------------------------------------

async def test_files_upload_retrieve_list_content_delete(tmp_path):
    async with batches_gateway(tmp_path) as b:
        data = jsonl([chat_line("a"), chat_line("b")])
        f = await b.sdk.files.create(file=("mine.jsonl", data), purpose="batch")
        assert f.object == "file" and f.purpose == "batch" and f.filename == "mine.jsonl"
        assert f.bytes == len(data) and f.status == "processed" and f.id.startswith("file-")
        assert f.created_at == int(T0.timestamp())
        assert (await b.sdk.files.retrieve(f.id)).model_dump() == f.model_dump()
        assert (await b.sdk.files.content(f.id)).content == data
        second = await b.upload([chat_line("c")])
        listed = await b.sdk.files.list()
        assert [x.id for x in listed.data] == [second.id, f.id]  # newest first
        page = await b.sdk.files.list(limit=1, order="asc")
        assert [x.id for x in page.data] == [f.id] and page.has_more
        deleted = await b.sdk.files.delete(f.id)
        assert deleted.deleted and deleted.id == f.id
        with pytest.raises(openai.NotFoundError) as exc:
            await b.sdk.files.retrieve(f.id)
        assert exc.value.body["code"] == "file_not_found"
        # Another tenant sees none of it.
        with pytest.raises(openai.NotFoundError):
            await b.gw.openai("globex").files.retrieve(second.id)
        assert (await b.gw.openai("globex").files.list()).data == []


BAD_FILES = {
    "bad JSON": (b'{"custom_id": "a", "method": "POST",\n', "invalid_json_line"),
    "not an object": (b"[1, 2]\n", "invalid_json_line"),
    "missing custom_id": (jsonl([{k: v for k, v in chat_line("a").items()
                                  if k != "custom_id"}]), "missing_custom_id"),
    "duplicate custom_id": (jsonl([chat_line("a"), chat_line("a")]), "duplicate_custom_id"),
    "wrong url": (jsonl([{**chat_line("a"), "url": "/v1/images/generations"}]), "invalid_url"),
    "two endpoints": (jsonl([chat_line("a"), {**chat_line("b"), "url": "/v1/completions"}]),
                      "mismatched_url"),
    "GET": (jsonl([{**chat_line("a"), "method": "GET"}]), "invalid_method"),
    "no body": (jsonl([{**chat_line("a"), "body": "hi"}]), "invalid_body"),
    "stream": (jsonl([{**chat_line("a"), "body": {**chat_line("a")["body"], "stream": True}}]),
               "invalid_body"),
    "too many lines": (jsonl([chat_line(str(i)) for i in range(4)]), "too_many_lines"),
    "empty": (b"\n\n", "empty_file"),
    "not UTF-8": (b'{"custom_id": "\xff"}\n', "invalid_file_encoding"),
}


@pytest.mark.parametrize("case", BAD_FILES)
async def test_upload_refuses_a_bad_batch_file(tmp_path, case):
    data, code = BAD_FILES[case]
    async with batches_gateway(tmp_path, site_policy(max_lines=3)) as b:
        with pytest.raises(openai.BadRequestError) as exc:
            await b.sdk.files.create(file=("in.jsonl", data), purpose="batch")
        assert exc.value.status_code == 400
        assert exc.value.body["code"] == code and exc.value.body["param"] == "file"
        assert exc.value.body["type"] == "invalid_request_error"
        assert (await b.sdk.files.list()).data == []


async def test_upload_refuses_other_purposes_missing_file_and_oversize(tmp_path):
    async with batches_gateway(tmp_path, site_policy(max_file_bytes=2048)) as b:
        with pytest.raises(openai.BadRequestError) as exc:
            await b.sdk.files.create(file=("in.jsonl", jsonl([chat_line("a")])),
                                     purpose="fine-tune")
        assert exc.value.body["code"] == "invalid_purpose"
        r = await b.gw.http.post("/v1/files", data={"purpose": "batch"},
                                 files={"other": ("x", b"y")}, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        big = jsonl([chat_line(str(i), content="x" * 100) for i in range(40)])
        with pytest.raises(openai.APIStatusError) as exc:
            await b.sdk.files.create(file=("in.jsonl", big), purpose="batch")
        assert exc.value.status_code == 413
        assert exc.value.body["code"] == "request_too_large"
        r = await b.gw.http.post("/v1/files", data={"purpose": "batch"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- creating batches -----------------------------------------------------------------------------

async def test_create_refuses_unknown_files_and_bad_parameters(tmp_path):
    async with batches_gateway(tmp_path) as b:
        with pytest.raises(openai.NotFoundError) as exc:
            await b.sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                       completion_window="24h")
        assert exc.value.body["param"] == "input_file_id"
        f = await b.upload([chat_line("a")])
        theirs = await b.upload([chat_line("a")], who="globex")
        with pytest.raises(openai.NotFoundError):
            await b.sdk.batches.create(input_file_id=theirs.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        cases = [({"endpoint": "/v1/completions"}, "endpoint_mismatch"),
                 ({"endpoint": "/v1/moderations"}, "invalid_endpoint"),
                 ({"completion_window": "forever"}, "invalid_completion_window"),
                 ({"completion_window": "30d"}, "invalid_completion_window"),
                 ({"metadata": {"k": "v" * 600}}, "invalid_metadata"),
                 ({"colour": "blue"}, "unknown_parameter")]
        for change, code in cases:
            body = {"input_file_id": f.id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h", **change}
            r = await b.gw.post("/v1/batches", body)
            assert r.status_code == 400, change
            assert r.json()["error"]["code"] == code, change
        with pytest.raises(openai.NotFoundError) as exc:
            await b.sdk.batches.retrieve("batch_nope")
        assert exc.value.body["code"] == "batch_not_found"
        assert (await b.sdk.batches.list()).data == []


# -- a batch's life -------------------------------------------------------------------------------

async def test_lifecycle_output_and_error_files_counts_usage_and_budget(tmp_path):
    p = policy({"budgets": [{"window": "1d", "joules": 100_000}]})  # no site: runs at once
    async with batches_gateway(tmp_path, p) as b:
        lines = [chat_line("one"), chat_line("two", model="no-such-model"), chat_line("three")]
        batch = await b.submit(lines, metadata={"job": "nightly"})
        assert batch.status == "validating" and batch.object == "batch"
        assert batch.endpoint == "/v1/chat/completions" and batch.completion_window == "24h"
        assert batch.metadata == {"job": "nightly"}
        assert batch.request_counts.total == 3 and batch.request_counts.completed == 0
        assert batch.expires_at == int((T0 + timedelta(hours=24)).timestamp())
        assert batch.model_extra["carbon"]["source"] == "none"
        await b.service.settle()
        done = await b.sdk.batches.retrieve(batch.id)
        assert done.status == "completed"
        assert done.in_progress_at == done.finalizing_at == done.completed_at == int(T0.timestamp())
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (3, 2, 1)
        assert done.usage.input_tokens == 20 and done.usage.output_tokens == 8
        assert done.usage.total_tokens == 28

        out = await b.lines(done.output_file_id)
        assert [line["custom_id"] for line in out] == ["one", "three"]
        for line in out:
            assert set(line) == {"id", "custom_id", "response", "error"}
            assert line["error"] is None and line["id"].startswith("batch_req_")
            response = line["response"]
            assert response["status_code"] == 200 and response["request_id"] == line["id"]
            assert response["body"]["object"] == "chat.completion"
            assert response["body"]["choices"][0]["message"]["content"] == "Hello, world."
            assert response["body"]["usage"]["energy_joules"] == LINE_JOULES
        [err] = await b.lines(done.error_file_id)
        assert err["custom_id"] == "two" and err["error"] is None
        assert err["response"]["status_code"] == 400
        assert err["response"]["body"]["error"]["code"] == "model_not_found"
        out_file = await b.sdk.files.retrieve(done.output_file_id)
        assert out_file.purpose == "batch_output"
        assert out_file.filename == f"{batch.id}_output.jsonl"

        # Each request went through the pipeline as the tenant: routed, charged, counted.
        assert len(b.gw.backends["up-big"].requests) == 2
        assert (await b.gw.budget())["1d"]["spent_joules"] == pytest.approx(2 * LINE_JOULES)
        assert done.model_extra["carbon"]["energy_joules"] == pytest.approx(2 * LINE_JOULES)
        assert await b.gw.metric("joulegate_requests_total", tenant="acme") == 3
        assert await b.service.store.call(b.service.store.attempts, batch.id) == \
            {"one": 1, "two": 1, "three": 1}
        listed = await b.sdk.batches.list()
        assert [x.id for x in listed.data] == [batch.id]


async def test_embeddings_completions_and_responses_batches(tmp_path):
    async with batches_gateway(tmp_path, policy()) as b:
        f = await b.upload([{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": "big", "input": "some text"}}])
        batch = await b.sdk.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                           completion_window="24h")
        f2 = await b.upload([{"custom_id": "c", "method": "POST", "url": "/v1/completions",
                              "body": {"model": "big", "prompt": "def f():"}}])
        batch2 = await b.sdk.batches.create(input_file_id=f2.id, endpoint="/v1/completions",
                                            completion_window="1h")
        f3 = await b.upload([{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                              "body": {"model": "big", "input": "hello"}}])
        batch3 = await b.sdk.batches.create(input_file_id=f3.id, endpoint="/v1/responses",
                                            completion_window="24h")
        await b.service.settle()
        [e] = await b.lines((await b.sdk.batches.retrieve(batch.id)).output_file_id)
        assert e["response"]["body"]["object"] == "list"
        assert e["response"]["body"]["data"][0]["object"] == "embedding"
        [c] = await b.lines((await b.sdk.batches.retrieve(batch2.id)).output_file_id)
        assert c["response"]["body"]["object"] == "text_completion"
        done3 = await b.sdk.batches.retrieve(batch3.id)
        [r] = await b.lines(done3.output_file_id)
        assert r["response"]["body"]["object"] == "response"
        assert r["response"]["body"]["status"] == "completed"
        assert done3.usage.input_tokens == 10 and done3.usage.output_tokens == 4


async def test_runs_in_the_cleanest_hour_of_the_window_and_reports_co2_avoided(tmp_path):
    async with batches_gateway(tmp_path) as b:
        batch = await b.submit([chat_line(f"r{i}") for i in range(3)])
        carbon = batch.model_extra["carbon"]
        cleanest = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
        assert carbon["site"] == "grid" and carbon["source"] == "schedule"
        assert carbon["scheduled_at"] == int(cleanest.timestamp())
        assert carbon["g_per_kwh_at_submit"] == 400.0 and carbon["g_per_kwh_at_start"] == 100.0

        await b.at(cleanest - timedelta(seconds=1))  # not before
        waiting = await b.sdk.batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts.completed == 0
        assert b.gw.backends["up-big"].requests == []

        await b.at(cleanest)
        done = await b.sdk.batches.retrieve(batch.id)
        assert done.status == "completed" and done.completed_at == int(cleanest.timestamp())
        assert done.request_counts.completed == 3
        assert len(b.gw.backends["up-big"].requests) == 3
        carbon = done.model_extra["carbon"]
        assert carbon["started_at"] == int(cleanest.timestamp())
        # By hand: 3 requests x 28 J x PUE 1.5 = 126 facility J = 3.5e-5 kWh; at 03:00 the grid
        # gives 100 g/kWh, at submission (00:30) 400 g/kWh.
        kwh = 3 * LINE_JOULES * PUE / J_PER_KWH
        assert carbon["facility_joules"] == pytest.approx(126.0)
        assert carbon["co2_g"] == pytest.approx(kwh * 100, abs=1e-6)
        assert carbon["co2_g_if_immediate"] == pytest.approx(kwh * 400, abs=1e-6)
        assert carbon["co2_g_avoided"] == pytest.approx(kwh * 300, abs=1e-6)
        log_path = b.gw.runtime.usage_log.path
    # The usage log says when each request could have run (for `joulegate report`).
    records = [r for r in read_usage(log_path) if r["tenant"] == "acme"]
    assert len(records) == 3 and {r["sub"] for r in records} == {T0.timestamp()}


async def test_a_window_that_closes_before_the_clean_hour_runs_in_the_cleanest_it_has(tmp_path):
    async with batches_gateway(tmp_path) as b:
        # 00:30 + 2h: hours 0 (400 g) and 1-2 (400 g, the schedule's previous hour): no
        # cleaner hour inside, so it starts at once.
        batch = await b.submit([chat_line("a")], window="2h")
        assert batch.model_extra["carbon"]["scheduled_at"] == int(T0.timestamp())
        await b.service.settle()
        assert (await b.sdk.batches.retrieve(batch.id)).status == "completed"


async def test_cancel_before_it_runs(tmp_path):
    async with batches_gateway(tmp_path) as b:
        batch = await b.submit([chat_line("a"), chat_line("b")])
        cancelling = await b.sdk.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at == int(T0.timestamp())
        await b.service.settle()
        cancelled = await b.sdk.batches.retrieve(batch.id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at == int(T0.timestamp())
        await b.at(T0 + timedelta(hours=5))  # past its clean hour: still nothing ran
        assert cancelled.output_file_id is None and cancelled.error_file_id is None
        assert cancelled.request_counts.completed == 0
        assert b.gw.backends["up-big"].requests == []
        assert (await b.sdk.batches.cancel(batch.id)).status == "cancelled"  # idempotent


async def test_cancel_while_running_lets_the_request_in_flight_finish(tmp_path):
    gate = {}

    def script(request):
        from .scripted import Script

        if len(gw.backends["up-big"].requests) == 2:  # the second request: cancel now
            import asyncio
            gate["task"] = asyncio.get_running_loop().create_task(
                gw.http.post(f"/v1/batches/{gate['id']}/cancel", headers=auth()))
            return Script(first_token_delay_s=0.5)  # the cancel lands meanwhile
        return Script()

    async with batches_gateway(tmp_path, site_policy(concurrency=1),
                               scripts={"up-big": script}) as b:
        gw = b.gw
        batch = await b.submit([chat_line(f"r{i}") for i in range(4)], window="1h")
        gate["id"] = batch.id
        await b.service.settle()
        assert (await gate["task"]).json()["status"] == "cancelling"
        await b.service.settle()
        cancelled = await b.sdk.batches.retrieve(batch.id)
        assert cancelled.status == "cancelled"
        assert len(gw.backends["up-big"].requests) == 2
        assert cancelled.request_counts.completed == 2
        assert [x["custom_id"] for x in await b.lines(cancelled.output_file_id)] == ["r0", "r1"]
        done = await b.submit([chat_line("x")], window="1h")
        await b.service.settle()
        assert (await b.sdk.batches.retrieve(done.id)).status == "completed"
        with pytest.raises(openai.BadRequestError) as exc:  # a finished batch cannot be
            await b.sdk.batches.cancel(done.id)
        assert exc.value.body["code"] == "batch_not_cancellable"


async def test_expired_window_puts_every_request_left_in_the_error_file(tmp_path):
    async with batches_gateway(tmp_path) as b:
        batch = await b.submit([chat_line("a"), chat_line("b")])
        await b.at(T0 + timedelta(hours=25))  # the gateway slept through the whole window
        expired = await b.sdk.batches.retrieve(batch.id)
        assert expired.status == "expired"
        assert expired.expired_at == int((T0 + timedelta(hours=25)).timestamp())
        assert expired.request_counts.failed == 2 and expired.output_file_id is None
        errors = await b.lines(expired.error_file_id)
        assert [e["custom_id"] for e in errors] == ["a", "b"]
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired"
                   for e in errors)
        assert b.gw.backends["up-big"].requests == []


async def test_a_budget_refusal_waits_and_sends_again(tmp_path):
    # One request at a time: with two, whether r2 starts before r1's refusal pauses the
    # batch depends on which of r0's answer and r1's refusal comes first (a fresh clone
    # once saw r2 refused too), and the attempts below would be a race's.
    p = site_policy(concurrency=1)
    p["sites"]["grid"]["carbon"] = {"constant": 200}
    p["tenants"]["acme"].update(budgets=[{"window": "1d", "joules": 50}],
                                on_exhausted="reject", default_max_tokens=8)
    async with batches_gateway(tmp_path, p) as b:
        # The first request (28 J) fits the budget's 50 J; the next ones wait for a grant.
        batch = await b.submit([chat_line(f"r{i}") for i in range(3)], window="1h")
        await b.service.settle()
        running = await b.sdk.batches.retrieve(batch.id)
        assert running.status == "in_progress" and running.request_counts.completed == 1
        r = await b.gw.http.post("/admin/tenants/acme/budget/grant", headers=ADMIN,
                                 json={"window": "1d", "joules": 1000})
        assert r.status_code == 200
        await b.at(T0 + timedelta(minutes=5))
        done = await b.sdk.batches.retrieve(batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        # r1 was sent twice through the gateway (refused, then served), the model once.
        assert await b.service.store.call(b.service.store.attempts, batch.id) == \
            {"r0": 1, "r1": 2, "r2": 1}
        assert len(b.gw.backends["up-big"].requests) == 3
        assert (await b.gw.budget())["1d"]["spent_joules"] == pytest.approx(3 * LINE_JOULES)


async def test_list_batches_pages_newest_first(tmp_path):
    async with batches_gateway(tmp_path) as b:
        made = [(await b.submit([chat_line("a")])).id for _ in range(3)]
        page = await b.sdk.batches.list(limit=2)
        assert [x.id for x in page.data] == made[:0:-1] and page.has_more
        rest = await b.sdk.batches.list(limit=2, after=page.data[-1].id)
        assert [x.id for x in rest.data] == [made[0]] and not rest.has_more
        everything = [x.id async for x in b.sdk.batches.list(limit=1)]
        assert everything == made[::-1]
        with pytest.raises(openai.NotFoundError):
            await b.gw.openai("globex").batches.retrieve(made[0])


async def test_a_waiting_batch_survives_a_restart(tmp_path):
    async with batches_gateway(tmp_path) as b:
        batch = await b.submit([chat_line("a"), chat_line("b")])
    async with batches_gateway(tmp_path) as b:
        await b.service.settle()
        waiting = await b.sdk.batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts.total == 2
        await b.at(datetime(2026, 3, 2, 3, 0, tzinfo=UTC))
        done = await b.sdk.batches.retrieve(batch.id)
        assert done.status == "completed" and done.request_counts.completed == 2


async def test_files_and_outputs_expire_as_asked(tmp_path):
    async with batches_gateway(tmp_path, policy()) as b:
        f = await b.sdk.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch",
                                     expires_after={"anchor": "created_at", "seconds": 3600})
        assert f.expires_at == int(T0.timestamp()) + 3600
        batch = await b.sdk.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 7200})
        await b.service.settle()
        done = await b.sdk.batches.retrieve(batch.id)
        out = await b.sdk.files.retrieve(done.output_file_id)
        assert out.expires_at == int(T0.timestamp()) + 7200
        await b.at(T0 + timedelta(hours=1))
        with pytest.raises(openai.NotFoundError):
            await b.sdk.files.retrieve(f.id)
        assert (await b.sdk.files.retrieve(out.id)).id == out.id
        await b.at(T0 + timedelta(hours=2))
        with pytest.raises(openai.NotFoundError):
            await b.sdk.files.content(out.id)
        r = await b.gw.post("/v1/batches", {"input_file_id": f.id, "endpoint":
                                            "/v1/chat/completions", "completion_window": "24h",
                                            "output_expires_after": {"anchor": "created_at",
                                                                     "seconds": 60}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "output_expires_after"


def test_one_process_runs_a_batch_until_its_claim_lapses(tmp_path):
    """Worker processes share the store: a batch is claimed by one; another takes it over
    only once the holder's lease has run out (it died), or it gave the batch back."""
    from gateway.batches.store import BatchStore

    a, b = BatchStore(tmp_path / "b.sqlite"), BatchStore(tmp_path / "b.sqlite")
    try:
        doc = {"id": "batch_1", "status": "in_progress"}
        a.create_batch("acme", doc, {}, [("x", b"{}")])
        assert [r.id for r in a.claim("A", now=100.0, lease_s=60)] == ["batch_1"]
        assert b.claim("B", now=130.0, lease_s=60) == []
        assert [r.id for r in a.claim("A", now=150.0, lease_s=60)] == ["batch_1"]  # renewed
        assert b.claim("B", now=200.0, lease_s=60) == []
        assert [r.id for r in b.claim("B", now=211.0, lease_s=60)] == ["batch_1"]  # A died
        b.release("B")
        assert [r.id for r in a.claim("A", now=212.0, lease_s=60)] == ["batch_1"]
    finally:
        a.close()
        b.close()
