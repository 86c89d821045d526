"""The cascade in-process (``routing.estimator: cascade``, :mod:`gateway.cascade`): the cheap
tier answers unless its first tokens are unsure; an escalation is charged for both attempts,
exactly once, and says so in headers and metrics."""

from __future__ import annotations

import logging
import math

import pytest

from backends import GenerationRequest, TokenLogprob
from gateway.routing.estimators import prompt_confidence
from policies import PolicyError, parse_policy

from .inprocess import InProcessGateway, in_process_small, joules, policy, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

TOKENS = ["The", " answer", " is", " 4", "."]
SURE = math.log(0.95)    # confidence 0.95
UNSURE = math.log(0.30)  # confidence 0.30


def cascade_policy(budget: float | None = None, **cascade) -> dict:
    tenant: dict = {"default_tier": "small"}
    if budget is not None:
        tenant["budgets"] = [{"window": "1d", "joules": budget}]
    p = policy(tenant)
    p["routing"] = {"estimator": "cascade", "thresholds": {"big": 0.5},
                    "cascade": {"threshold": 0.8, "probe_tokens": 2, **cascade}}
    return p


def scripts(small_logprob: float) -> dict:
    return {"up-small": Script(tokens=TOKENS, logprob=small_logprob),
            "up-big": Script(tokens=["Four", "."])}


async def test_low_confidence_escalates_and_both_attempts_are_charged_exactly(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(budget=10_000), scripts(UNSURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "big"
        assert r.headers["x-joulegate-cascade"] == "small->big"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(0.30, abs=1e-3)
        assert "x-joulegate-fallback" not in r.headers
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Four."
        assert body["choices"][0]["message"].get("logprobs") is None
        assert "logprobs" not in body["choices"][0] or body["choices"][0]["logprobs"] is None
        # The probe read 2 of small's tokens, then closed its stream (generation stopped).
        small, big = gw.backends["up-small"], gw.backends["up-big"]
        assert small.calls.streams[0].closed_early and small.calls.streams[0].tokens_sent == 2
        assert small.requests[0].logprobs is True  # the probe asked for log-probabilities
        assert big.requests[0].logprobs is False   # the client did not
        # Both attempts' joules: small's prompt and 2 probed tokens, big's whole answer.
        want = joules(10, 2, "small") + joules(10, 2, "big")
        assert body["usage"]["energy_joules"] == pytest.approx(want)
        assert float(r.headers["x-joulegate-energy-joules"]) == pytest.approx(want)
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(want)
        assert (await gw.budget())["1d"]["reserved_joules"] == 0
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            pytest.approx(want)
        assert await gw.metric("joulegate_cascade_escalations_total", tenant="acme",
                               **{"from": "small", "to": "big"}) == 1
        assert await gw.metric("joulegate_route_decisions_total", tenant="acme", tier="big",
                               reason="cascade") == 1


async def test_high_confidence_keeps_the_cheap_answer(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(budget=10_000), scripts(SURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert r.headers["x-joulegate-cascade"] == "small"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(0.95, abs=1e-3)
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "".join(TOKENS)  # the probe's tokens and the rest
        assert choice["finish_reason"] == "stop" and choice.get("logprobs") is None
        assert r.json()["usage"]["completion_tokens"] == 5
        # One generation only: the probe's stream was read to its end.
        assert gw.backends["up-big"].requests == []
        assert len(gw.backends["up-small"].calls.streams) == 1
        assert gw.backends["up-small"].calls.streams[0].finished
        want = joules(10, 5, "small")
        assert r.json()["usage"]["energy_joules"] == pytest.approx(want)
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(want)
        assert await gw.metric("joulegate_cascade_escalations_total") == 0


async def test_a_client_that_asked_for_logprobs_gets_every_tokens(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(), scripts(SURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16, logprobs=True)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in content] == TOKENS


async def test_streaming_with_cascade_escalates_before_the_first_byte(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(budget=10_000), scripts(UNSURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16, stream=True,
                          stream_options={"include_usage": True})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-cascade"] == "small->big"
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if e["choices"])
        assert text == "Four."  # nothing of the dropped cheap answer
        usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
        want = joules(10, 2, "small") + joules(10, 2, "big")
        assert usage["energy_joules"] == pytest.approx(want)
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(want)


async def test_streaming_with_cascade_accepted_streams_the_probed_tokens_then_the_rest(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(budget=10_000), scripts(SURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16, stream=True,
                          stream_options={"include_usage": True})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert r.headers["x-joulegate-cascade"] == "small"
        events = sse_events(r.text)
        deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
        assert "".join(d or "" for d in deltas) == "".join(TOKENS)
        assert all(e["choices"][0].get("logprobs") is None for e in events[:-1] if e["choices"])
        usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
        assert usage["energy_joules"] == pytest.approx(joules(10, 5, "small"))
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(joules(10, 5, "small"))
        assert gw.backends["up-big"].requests == []


async def test_pinned_models_bypass_the_cascade(tmp_path):
    async with InProcessGateway(tmp_path, cascade_policy(), scripts(UNSURE)) as gw:
        r = await gw.chat(model="small", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert "x-joulegate-cascade" not in r.headers
        assert r.json()["choices"][0]["message"]["content"] == "".join(TOKENS)
        assert gw.backends["up-small"].requests[0].logprobs is False
        assert gw.backends["up-big"].requests == []
        assert await gw.metric("joulegate_cascade_escalations_total") == 0


async def test_other_estimators_never_probe(tmp_path):
    p = cascade_policy()
    p["routing"]["estimator"] = "heuristic"
    async with InProcessGateway(tmp_path, p, scripts(UNSURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.headers["x-joulegate-tier"] == "small" and "x-joulegate-cascade" not in r.headers
        assert gw.backends["up-small"].requests[0].logprobs is False


async def test_the_threshold_and_target_come_from_the_policy(tmp_path):
    # A threshold below the probe's confidence accepts it; `to` names the tier to escalate to.
    async with InProcessGateway(tmp_path, cascade_policy(threshold=0.2, to="big"),
                                scripts(UNSURE)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.headers["x-joulegate-cascade"] == "small"


async def test_a_cheap_tier_that_cannot_answer_falls_back_as_usual(tmp_path):
    s = {"up-small": Script.unavailable(), "up-big": Script(tokens=["Four", "."])}
    p = cascade_policy(budget=10_000)
    p["routing"]["fallback"] = "all"
    p["routing"]["fallback_ladder"] = ["small", "big"]
    async with InProcessGateway(tmp_path, p, s) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "big"
        assert r.json()["choices"][0]["message"]["content"] == "Four."
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(joules(10, 2, "big"))


@pytest.mark.parametrize(("down", "unsure", "ladder", "served", "cascade", "fallback"), [
    # The probe on small is unsure, big cannot answer, mid (next on the ladder) does.
    ("big", "small", ["small", "big", "mid"], "mid", "small->mid", "big->mid"),
    # Small cannot answer, mid is probed instead, is unsure, and escalates to big.
    ("small", "mid", ["small", "mid", "big"], "big", "mid->big", "small->mid"),
])
async def test_fallback_and_escalation_each_name_their_own_hop(
        tmp_path, caplog, down, unsure, ladder, served, cascade, fallback):
    """A fallback and an escalation in one request: the cascade header names the probed tier
    and the one that served, the fallback header the tier that failed and the one it handed
    the request to, and the access record names the failed tier (never the probed one)."""
    p = cascade_policy(budget=10_000, to="big")
    p["backends"]["up-mid"] = dict(p["backends"]["up-small"])
    p["tiers"].append({"name": "mid", "backend": "up-mid", "model": "mid-model", "cost": 1.5,
                       "joules_per_prompt_token": 1.5, "joules_per_output_token": 1.5})
    p["routing"]["fallback"] = "all"
    p["routing"]["fallback_ladder"] = ladder
    s = {f"up-{t}": Script(tokens=["Four", "."]) for t in ("small", "mid", "big")}
    s[f"up-{down}"] = Script.unavailable()
    s[f"up-{unsure}"] = Script(tokens=TOKENS, logprob=UNSURE)
    async with InProcessGateway(tmp_path, p, s) as gw:
        with caplog.at_level(logging.INFO, "joulegate.access"):
            r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == served
        assert r.headers["x-joulegate-cascade"] == cascade
        assert r.headers["x-joulegate-fallback"] == fallback
        (record,) = [r.access for r in caplog.records if hasattr(r, "access")]
        assert record["fallback_from"] == [down] and record["cascade_from"] == unsure
        assert (await gw.budget())["1d"]["reserved_joules"] == 0


@pytest.mark.parametrize(("statistic", "tier", "confidence"),
                         [("mean", "small", math.sqrt(0.95 * 0.60)), ("min", "big", 0.60)])
async def test_the_statistic_decides_how_the_probe_tokens_make_one_confidence(
        tmp_path, statistic, tier, confidence):
    # One unsure token among sure ones: their geometric mean (0.755) passes a 0.7 threshold,
    # the least likely token (0.60) does not.
    s = {"up-small": Script(tokens=TOKENS, token_logprobs=[math.log(0.95), math.log(0.60)]),
         "up-big": Script(tokens=["Four", "."])}
    async with InProcessGateway(tmp_path, cascade_policy(threshold=0.7, statistic=statistic),
                                s) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == tier
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(confidence,
                                                                                    abs=1e-3)


def test_a_policy_names_only_a_known_statistic(tmp_path):
    p = cascade_policy(statistic="median")
    with pytest.raises(PolicyError, match="statistic"):
        parse_policy(p)


# -- signal: prompt ---------------------------------------------------------------------------

FAMILIAR = math.log(0.9)    # how likely the cheap tier finds the request's words
UNFAMILIAR = math.log(0.2)


def prompt_policy(budget: float | None = None, disable: list[str] | None = None,
                  **cascade) -> dict:
    """``small`` on an in-process kind (the one that scores prompts), read by its prompt."""
    p = cascade_policy(budget, signal="prompt", threshold=0.5, **cascade)
    return in_process_small(p, disable)


def prompt_scripts(prompt_logprob: float, template_logprob: float = -0.01) -> dict:
    return {"up-small": Script(tokens=TOKENS, prompt_logprob=prompt_logprob,
                               template_logprob=template_logprob),
            "up-big": Script(tokens=["Four", "."])}


async def test_an_unfamiliar_prompt_escalates_after_the_prompt_is_read(tmp_path):
    async with InProcessGateway(tmp_path, prompt_policy(budget=10_000),
                                prompt_scripts(UNFAMILIAR)) as gw:
        r = await gw.chat(model="auto", content="Prove the Riemann hypothesis.", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "big"
        assert r.headers["x-joulegate-cascade"] == "small->big"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(0.2, abs=1e-3)
        assert r.json()["choices"][0]["message"]["content"] == "Four."
        small, big = gw.backends["up-small"], gw.backends["up-big"]
        # The cheap tier scored its prompt's last 512 tokens and was stopped before the
        # gateway read any of its answer; no answer log-probabilities were asked for, and the
        # strong tier scored nothing.
        assert small.requests[0].prompt_logprobs == 512 and small.requests[0].logprobs is False
        assert small.calls.streams[0].closed_early and small.calls.streams[0].tokens_sent == 0
        assert big.requests[0].prompt_logprobs == 0
        # Both attempts are charged, once: the prompt read and big's answer.
        body = r.json()
        spent = (await gw.budget())["1d"]["spent_joules"]
        assert body["usage"]["energy_joules"] == pytest.approx(spent)
        assert spent >= joules(10, 2, "big")
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            pytest.approx(spent)
        assert (await gw.budget())["1d"]["reserved_joules"] == 0
        assert await gw.metric("joulegate_cascade_escalations_total", tenant="acme",
                               **{"from": "small", "to": "big"}) == 1


async def test_a_familiar_prompt_keeps_the_answer_the_cheap_tier_is_making(tmp_path):
    async with InProcessGateway(tmp_path, prompt_policy(), prompt_scripts(FAMILIAR)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16, stream=True,
                          stream_options={"include_usage": True})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert r.headers["x-joulegate-cascade"] == "small"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(0.9, abs=1e-3)
        events = sse_events(r.text)
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
        # The prompt's scores are not the client's: every delta is the answer's.
        assert "".join(d.get("content") or "" for d in deltas) == "".join(TOKENS)
        assert all("prompt_logprobs" not in e for e in events[:-1])
        # One generation: the scored stream went on to the end.
        assert len(gw.backends["up-small"].calls.streams) == 1
        assert gw.backends["up-small"].calls.streams[0].finished
        assert gw.backends["up-big"].requests == []
        usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
        assert usage["completion_tokens"] == 5


async def test_the_prompt_signal_reads_the_users_words_not_the_template(tmp_path):
    # The template's tokens are very unlikely here; the user's words decide alone.
    async with InProcessGateway(tmp_path, prompt_policy(),
                                prompt_scripts(FAMILIAR, template_logprob=math.log(0.01))) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.headers["x-joulegate-cascade"] == "small"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(0.9, abs=1e-3)


async def test_a_tier_that_does_not_score_prompts_is_not_probed(tmp_path):
    async with InProcessGateway(tmp_path, prompt_policy(disable=["prompt_logprobs"]),
                                prompt_scripts(UNFAMILIAR)) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small" and "x-joulegate-cascade" not in r.headers
        assert gw.backends["up-small"].requests[0].prompt_logprobs == 0


async def test_a_fill_in_the_middle_request_is_not_judged_by_its_prompt(tmp_path):
    """A filled-in-the-middle prompt ends with the suffix and the model's middle token, not
    with the request's last words, which the prompt signal looks for: such a request is
    answered as routed, unprobed; the same prompt without a suffix is probed."""
    code = {"model": "auto", "prompt": "def area(r):\n    return ", "max_tokens": 16}
    async with InProcessGateway(tmp_path, prompt_policy(), prompt_scripts(UNFAMILIAR)) as gw:
        r = await gw.post("/v1/completions", {**code, "suffix": "\n\nprint(area(2))\n"})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small" and "x-joulegate-cascade" not in r.headers
        assert gw.backends["up-small"].requests[0].prompt_logprobs == 0
        r = await gw.post("/v1/completions", code)
        assert r.headers["x-joulegate-cascade"] == "small->big"


def test_prompt_confidence_finds_the_text_among_the_scored_tokens():
    def tokens(*pairs):
        return [TokenLogprob(t, lp, list(t.encode())) for t, lp in pairs]

    sure, unsure = math.log(0.9), math.log(0.1)
    chat = tokens(("<|user|>", unsure), ("\n", unsure), ("Hi", sure), (" there", sure),
                  ("<|end|>", unsure))
    assert prompt_confidence(chat, "Hi there") == pytest.approx(0.9)
    # Only the prompt's end was scored: the text's longest end found decides.
    end_only = tokens(("ere", sure), (" friend", sure), ("<|end|>", unsure))
    assert prompt_confidence(end_only, "Hello there friend") == pytest.approx(0.9)
    # Not there at all (a template that rewrote it): every scored token.
    assert prompt_confidence(chat, "Something else entirely") == pytest.approx(
        math.exp((3 * unsure + 2 * sure) / 5))
    assert prompt_confidence([], "anything") == 1.0


async def test_faults_while_the_prompt_is_read_end_in_openai_errors(tmp_path):
    """The cheap tier refuses the prompt, or breaks before its scores: a clear error (or the
    usual fallback), never a 500, nothing left reserved."""
    s = {"up-small": [Script.rejected("scripted: prompt exceeds the context", "messages"),
                      Script.broken_after(0)],
         "up-big": Script(tokens=["Four", "."])}
    async with InProcessGateway(tmp_path, prompt_policy(budget=10_000), s) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16, stream=True)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"]
        assert gw.backends["up-big"].requests == []
        assert (await gw.budget())["1d"]["reserved_joules"] == 0
    p = prompt_policy(budget=10_000)
    p["routing"]["fallback"] = "auto"
    p["routing"]["fallback_ladder"] = ["small", "big"]
    (tmp_path / "fallback").mkdir()
    async with InProcessGateway(tmp_path / "fallback", p,
                                {"up-small": Script.unavailable(),
                                 "up-big": Script(tokens=["Four", "."])}) as gw:
        r = await gw.chat(model="auto", content="What is 2 + 2?", max_tokens=16)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "big"
        assert r.json()["choices"][0]["message"]["content"] == "Four."
        assert (await gw.budget())["1d"]["reserved_joules"] == 0


# -- prior: a one-shot estimator's score lowers the probe's confidence ------------------------

HARD = ("Prove step by step that the two algorithms below are equivalent, then compare their "
        "complexity and design a third one:\n```python\ndef f(x):\n    return x * 2\n```")


@pytest.mark.parametrize("signal", ["prompt", "answer"])
async def test_a_prior_lowers_the_confidence_by_the_requests_difficulty(tmp_path, signal):
    """The same sure probe (0.9) is kept alone, and escalated once the heuristic's difficulty
    of a hard-looking request lowers it below the threshold: 0.9 x exp(-w x d)."""
    from gateway.routing.estimators import HeuristicEstimator, with_prior
    from gateway.routing.features import RequestText

    def made(**prior) -> dict:
        if signal == "prompt":
            return prompt_policy(**prior)
        return cascade_policy(threshold=0.5, **prior)

    s = prompt_scripts(FAMILIAR) if signal == "prompt" else scripts(FAMILIAR)
    d = HeuristicEstimator().score_text(RequestText.of(chat_request(HARD))).score
    assert 0.2 < d < 1  # hard enough for the weights below to tell
    for weight, tier in ((0.0, "small"), (3.0, "big")):
        expected = with_prior(0.9, d, weight)
        assert (expected >= 0.5) == (tier == "small")
        async with InProcessGateway(tmp_path, made(prior="heuristic", prior_weight=weight),
                                    s) as gw:
            r = await gw.chat(model="auto", content=HARD, max_tokens=16)
            assert r.status_code == 200, r.text
            assert r.headers["x-joulegate-tier"] == tier
            assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(
                expected, rel=1e-3)
    # An easy request is barely touched by the same weight.
    easy = HeuristicEstimator().score_text(RequestText.of(chat_request("Hi"))).score
    async with InProcessGateway(tmp_path, made(prior="heuristic", prior_weight=3.0), s) as gw:
        r = await gw.chat(model="auto", content="Hi", max_tokens=16)
        assert r.headers["x-joulegate-tier"] == "small"
        assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(
            with_prior(0.9, easy, 3.0), rel=1e-3)


def chat_request(content: str) -> GenerationRequest:
    return GenerationRequest(model="auto", messages=[{"role": "user", "content": content}],
                             max_tokens=16)


# -- capacity: the target tier's window holds for escalations ---------------------------------

def by_confidence(request: GenerationRequest) -> Script:
    """A cheap answer as sure as the message says: ``"... c=0.9"``."""
    sure = float(str(request.messages[-1]["content"]).rsplit("c=", 1)[1])  # type: ignore[index]
    return Script(tokens=TOKENS, logprob=math.log(sure))


@pytest.mark.parametrize("thresholds", [True, False], ids=["with-thresholds", "no-thresholds"])
async def test_a_capacity_on_the_target_tier_lets_only_the_least_sure_escalate(
        tmp_path, caplog, thresholds):
    """With ``threshold: 1`` every probe wants to escalate; ``capacity: {big: 0.5}`` lets
    through only requests among the least sure half of the tenant's recent ones (the window
    ranks them by 1 - confidence once probed), within half of them in all (a young window
    allows one). Each held escalation says so: header, metric and access record. A cascade
    needs no routing ``thresholds``, and the capacity holds without them too (it once
    recorded nothing there, and every probe escalated)."""
    p = cascade_policy(threshold=1.0)
    p["routing"]["capacity"] = {"big": {"fraction": 0.5, "window_s": 3600}}
    if not thresholds:
        del p["routing"]["thresholds"]
    sure = [0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.1]
    expected = ["big",    # a young window's burst of one
                "small",  # the share: 2 of 2 would be over half
                "small",  # 2 of 3
                "big",    # 2 of 4: ties with the window's median
                "small",  # 3 of 5: over half
                "small",  # 3 of 6 is within half, but 0.9 is among the surest half
                "big"]    # 3 of 7, the least sure yet
    s = {"up-small": by_confidence, "up-big": Script(tokens=["Four", "."])}
    async with InProcessGateway(tmp_path, p, s) as gw:
        served = []
        with caplog.at_level(logging.INFO, "joulegate.access"):
            for i, c in enumerate(sure):
                r = await gw.chat(model="auto", content=f"question {i}: c={c}", max_tokens=16)
                assert r.status_code == 200, r.text
                assert float(r.headers["x-joulegate-cascade-confidence"]) == pytest.approx(
                    c, 1e-3)
                served.append(r.headers["x-joulegate-tier"])
                assert r.headers["x-joulegate-cascade"] == (
                    "small->big" if served[-1] == "big" else "small")
                assert r.headers.get("x-joulegate-cascade-held") == (
                    None if served[-1] == "big" else "big")
        assert served == expected
        assert await gw.metric("joulegate_cascade_escalations_total", tenant="acme",
                               **{"from": "small", "to": "big"}) == 3
        assert await gw.metric("joulegate_cascade_capacity_holds_total", tenant="acme",
                               **{"from": "small", "to": "big"}) == 4
        records = [r.access for r in caplog.records if hasattr(r, "access")]
        assert [(r["tier"], r["cascade_from"], r["cascade_held"]) for r in records] == [
            ("big", "small", None) if t == "big" else ("small", None, "big") for t in expected]
        assert [r["cascade_confidence"] for r in records] == pytest.approx(sure, rel=1e-3)
        assert all(r["fallback_from"] == [] for r in records)  # an escalation is no fallback
        assert await gw.metric("joulegate_capacity_fraction", tenant="acme",
                               tier="big") == pytest.approx(3 / 7)
    # Without the capacity, every one of them escalates.
    async with InProcessGateway(tmp_path, cascade_policy(threshold=1.0), s) as gw:
        for i, c in enumerate(sure):
            r = await gw.chat(model="auto", content=f"question {i}: c={c}", max_tokens=16)
            assert r.headers["x-joulegate-tier"] == "big"


async def test_a_prior_without_a_weight_is_warned_of(tmp_path, caplog):
    # prior_weight's default is 0 (what leave-one-out picks): a prior named without a weight
    # would do nothing, silently, so the gateway says so when it loads the policy.
    with caplog.at_level(logging.WARNING, "joulegate"):
        async with InProcessGateway(tmp_path, cascade_policy(prior="heuristic"), scripts(SURE)):
            pass
    [warned] = [r.getMessage() for r in caplog.records if "prior_weight" in r.getMessage()]
    assert "prior has no effect" in warned and "tenants 'acme', 'globex'" in warned
    caplog.clear()
    (tmp_path / "weighted").mkdir()
    with caplog.at_level(logging.WARNING, "joulegate"):
        async with InProcessGateway(tmp_path / "weighted",
                                    cascade_policy(prior="heuristic", prior_weight=3.0),
                                    scripts(SURE)):
            pass
    assert not [r for r in caplog.records if "prior_weight" in r.getMessage()]
