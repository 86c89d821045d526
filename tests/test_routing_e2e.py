"""Difficulty routing through a real gateway process, with the OpenAI SDK as the client.

The tiers run on the fast fake upstream (tests/fake_upstream.py), priced per token, so
every test is about the routing decision, not about a model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
import pytest

from .conftest import ADMIN_KEY, KEYS, Gateway, priced_policy

if TYPE_CHECKING:
    import openai

pytestmark = pytest.mark.e2e

EASY = "Say hello in one short sentence."
HARD = ("Prove step by step that the algorithm below terminates, then derive its worst-case "
        "complexity and compare it with a heap-based design. Statement 1 | every call shrinks "
        "the input. Statement 2 | the loop invariant holds after each iteration.\n"
        "```python\ndef f(xs):\n    return sorted(xs)[::2]\n```\n" + "Consider the edge cases. " * 30)


@pytest.fixture
def gateway_for(upstream, gateways):
    def make(routing: dict, **tenant_extra) -> Gateway:
        policy = priced_policy(upstream.url, {"default_tier": "small", **tenant_extra})
        policy["routing"] = {"estimator": "heuristic", "thresholds": {"big": 0.45}, **routing}
        return gateways(policy)

    return make


def ask(client: openai.OpenAI, prompt: str, model: str = "auto", **headers):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12,
        extra_headers=headers or None)
    return raw.headers, raw.parse()


def metric(gw: Gateway, name: str, **labels) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_auto_sends_easy_prompts_to_small_and_hard_ones_to_big(gateway_for):
    gw = gateway_for({})
    client = gw.client()
    headers, easy = ask(client, EASY)
    assert headers["x-joulegate-tier"] == "small" and easy.model == "small-model"
    assert float(headers["x-joulegate-difficulty"]) < 0.45
    headers, hard = ask(client, HARD)
    assert headers["x-joulegate-tier"] == "big" and hard.model == "big-model"
    assert float(headers["x-joulegate-difficulty"]) >= 0.45
    assert hard.usage.model_extra["energy_joules"] > 0
    assert metric(gw, "joulegate_route_decisions_total", tenant="acme", tier="small", reason="gate") == 1
    assert metric(gw, "joulegate_route_decisions_total", tenant="acme", tier="big", reason="gate") == 1
    assert metric(gw, "joulegate_difficulty_score_count", tenant="acme") == 2


def test_pins_and_the_max_tier_header(gateway_for):
    import openai

    gw = gateway_for({})
    client = gw.client()
    headers, _ = ask(client, EASY, model="big")
    assert headers["x-joulegate-tier"] == "big" and "x-joulegate-difficulty" not in headers
    headers, _ = ask(client, HARD, model="big-model")  # the concrete model name pins too
    assert headers["x-joulegate-tier"] == "big"
    headers, _ = ask(client, HARD, **{"X-Joulegate-Max-Tier": "small"})
    assert headers["x-joulegate-tier"] == "small"
    assert metric(gw, "joulegate_route_decisions_total", tier="big", reason="pinned") == 2
    assert metric(gw, "joulegate_route_decisions_total", tier="small", reason="capped") == 1

    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, HARD, **{"X-Joulegate-Max-Tier": "huge"})
    err = bad.value.body
    assert err["param"] == "X-Joulegate-Max-Tier" and err["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, EASY, model="big", **{"X-Joulegate-Max-Tier": "small"})
    assert bad.value.body["code"] == "above_max_tier" and bad.value.body["param"] == "model"
    # Refused requests cost nothing and spend nothing.
    assert metric(gw, "joulegate_energy_joules_total", tenant="acme") == pytest.approx(
        2 * 48 + 24, rel=0.01)


def test_capacity_keeps_big_to_its_share_of_requests(gateway_for):
    gw = gateway_for({"capacity": {"big": {"fraction": 0.25, "window_s": 600}}})
    client = gw.client()
    tiers = [ask(client, HARD)[0]["x-joulegate-tier"] for _ in range(12)]
    assert 1 <= tiers.count("big") <= 3
    assert metric(gw, "joulegate_route_decisions_total", tier="small", reason="capacity") >= 9
    assert 0 < metric(gw, "joulegate_capacity_fraction", tenant="acme", tier="big") <= 0.25


def test_budget_pressure_moves_hard_prompts_down_before_the_budget_runs_out(gateway_for):
    # No raise while more than 90% of the budget is left, then thresholds rise past 1.
    gw = gateway_for({"pressure": [[0.9, 0.0], [0.89, 1.0]]},
                     budgets=[{"window": "1d", "joules": 1000}])
    client = gw.client()
    tiers = [ask(client, HARD)[0]["x-joulegate-tier"] for _ in range(6)]
    assert tiers[0] == "big" and tiers[-1] == "small"
    first_small = tiers.index("small")
    assert set(tiers[first_small:]) == {"small"}
    assert metric(gw, "joulegate_route_decisions_total", tier="small", reason="budget") >= 1
    budget = httpx.get(f"{gw.url}/v1/models", timeout=10,
                       headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert budget.status_code == 200  # the tenant is still served: nothing was refused


def test_a_tier_that_cannot_answer_falls_back_down_the_ladder(gateway_for, upstream):
    import openai

    from .conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gw = gateway_for({})
    policy = yaml_policy(gw)
    policy["backends"]["up-big"]["base_url"] = dead
    gw.write_policy(policy)
    assert httpx.post(f"{gw.url}/admin/reload", timeout=30,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    client = gw.client()
    headers, reply = ask(client, HARD)
    assert headers["x-joulegate-tier"] == "small" and headers["x-joulegate-fallback"] == "big->small"
    assert reply.model == "small-model"
    with pytest.raises(openai.InternalServerError) as pinned:  # pinned: no fallback by default
        ask(client, HARD, model="big")
    assert pinned.value.status_code == 503
    stream = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": HARD}],
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].model == "small-model"
    assert metric(gw, "joulegate_fallbacks_total", tenant="acme", **{"from": "big", "to": "small"}) == 2

    policy["routing"]["fallback"] = "all"
    gw.write_policy(policy)
    httpx.post(f"{gw.url}/admin/reload", timeout=30, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    headers, _ = ask(client, HARD, model="big")
    assert headers["x-joulegate-tier"] == "small"


def yaml_policy(gw: Gateway) -> dict:
    import yaml

    return yaml.safe_load(gw.policy_path.read_text())
