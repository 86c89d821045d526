"""The cascade on a real llama.cpp tier (its log-probabilities from inside the sampler), through
a real gateway: a threshold no answer reaches escalates, one every answer reaches does not,
whole and streamed, and the tenant's ledger holds exactly the joules reported."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import ADMIN_KEY, KEYS, SMALL_MODEL_ID, llamacpp_policy

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France? Answer in one word."


def cascade_policy(threshold: float) -> dict:
    policy = llamacpp_policy()
    # A costlier tier on the same small model: the cascade's mechanics at a small model's cost.
    policy["tiers"].append({"name": "full", "backend": "q05", "model": SMALL_MODEL_ID + "-b",
                            "cost": 2.0})
    policy["routing"] = {"estimator": "cascade", "thresholds": {"full": 0.5},
                         "cascade": {"threshold": threshold, "probe_tokens": 4}}
    policy["tenants"]["acme"]["budgets"] = [{"window": "1d", "joules": 1_000_000}]
    return policy


def ask(url: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300,
                      headers={"authorization": f"Bearer {KEYS['acme']}"},
                      json={"model": "auto", "max_tokens": 8, "temperature": 0,
                            "messages": [{"role": "user", "content": QUESTION}], **extra})


def spent(url: str) -> float:
    r = httpx.get(f"{url}/admin/tenants/acme/budget", timeout=30,
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return next(w["spent_joules"] for w in r.json()["windows"] if w["window"] == "1d")


def test_a_threshold_no_answer_reaches_escalates(gateways, small_model_path):
    gw = gateways(cascade_policy(threshold=1.0))  # confidence is below 1 for any real answer
    r = ask(gw.url)
    assert r.status_code == 200, r.text
    assert r.headers["x-joulegate-tier"] == "full"
    assert r.headers["x-joulegate-cascade"] == "small->full"
    assert 0 < float(r.headers["x-joulegate-cascade-confidence"]) < 1
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    whole = r.json()["usage"]["energy_joules"]
    stream = ask(gw.url, stream=True, stream_options={"include_usage": True})
    assert stream.status_code == 200 and stream.headers["x-joulegate-cascade"] == "small->full"
    assert stream.text.rstrip().endswith("data: [DONE]")
    metrics = httpx.get(f"{gw.url}/metrics", timeout=30).text
    assert 'joulegate_cascade_escalations_total{from="small",tenant="acme",to="full"} 2.0' in metrics
    events = [json.loads(line[len("data: "):]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    streamed = next(e["usage"]["energy_joules"] for e in events if e.get("usage"))
    # Both requests paid for their probe and their answer, once: the ledger holds the sum.
    assert spent(gw.url) == pytest.approx(whole + streamed, abs=1e-6)


def test_a_threshold_every_answer_reaches_keeps_the_cheap_answer(gateways, small_model_path):
    gw = gateways(cascade_policy(threshold=0.0))
    r = ask(gw.url)
    assert r.status_code == 200, r.text
    assert r.headers["x-joulegate-tier"] == "small" and r.headers["x-joulegate-cascade"] == "small"
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    assert r.json()["choices"][0].get("logprobs") is None  # the probe's, not asked for
    assert spent(gw.url) == pytest.approx(r.json()["usage"]["energy_joules"], abs=1e-6)
    pinned = httpx.post(f"{gw.url}/v1/chat/completions", timeout=300,
                        headers={"authorization": f"Bearer {KEYS['acme']}"},
                        json={"model": "full", "max_tokens": 4,
                              "messages": [{"role": "user", "content": QUESTION}]})
    assert pinned.status_code == 200 and "x-joulegate-cascade" not in pinned.headers


def test_the_prompt_signal_escalates_text_the_cheap_tier_finds_unfamiliar(gateways,
                                                                           small_model_path):
    """``signal: prompt`` on the real model: a plain question reads as likely, the same words
    scrambled do not; one threshold between them keeps the one and escalates the other (its
    probe a prompt read), streamed too, and the ledger holds exactly the joules reported."""
    policy = cascade_policy(threshold=0.0)
    policy["routing"]["cascade"] = {"signal": "prompt", "threshold": 0.0}
    gw = gateways(policy)
    scrambled = "Word capital in France? one Answer the of is What."
    confidence = {}
    for text in (QUESTION, scrambled):
        r = ask(gw.url, messages=[{"role": "user", "content": text}])
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-cascade"] == "small"  # threshold 0: always kept
        confidence[text] = float(r.headers["x-joulegate-cascade-confidence"])
    assert 0 < confidence[scrambled] < confidence[QUESTION] < 1
    # The same gateway with a threshold between the two (a policy reload would do; a second
    # gateway keeps the test plain).
    policy["routing"]["cascade"]["threshold"] = (confidence[QUESTION] + confidence[scrambled]) / 2
    gw2 = gateways(policy)
    kept = ask(gw2.url)
    assert kept.headers["x-joulegate-cascade"] == "small" and "Paris" in kept.text
    up = ask(gw2.url, messages=[{"role": "user", "content": scrambled}], stream=True,
             stream_options={"include_usage": True})
    assert up.status_code == 200 and up.headers["x-joulegate-cascade"] == "small->full"
    assert up.text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[len("data: "):]) for line in up.text.splitlines()
              if line.startswith("data: {")]
    streamed = next(e["usage"]["energy_joules"] for e in events if e.get("usage"))
    assert spent(gw2.url) == pytest.approx(
        kept.json()["usage"]["energy_joules"] + streamed, abs=1e-6)
