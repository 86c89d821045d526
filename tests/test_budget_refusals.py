"""Budget refusals that tell the truth, through the official `openai` SDK: a request larger
than a window's whole budget is a 400 that says what would fit (no Retry-After, so the SDK
does not retry); one that fits later is a 429 whose Retry-After is when enough budget frees."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import pytest

from .conftest import KEYS, Gateway, priced_policy

if TYPE_CHECKING:
    import openai

pytestmark = pytest.mark.e2e

# 32 characters: estimated at 32 // 4 + 4 = 12 prompt tokens, the fake upstream's fixed
# count; tier big costs 2 J per token (prompt and output), small 1 J.
HI = [{"role": "user", "content": "Say hello in one short sentence."}]


def requests_seen(gw: Gateway, tenant: str = "acme") -> float:
    """Requests the gateway answered for ``tenant``, from its own counter."""
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("joulegate_requests_total{") and f'tenant="{tenant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def sdk(gw: Gateway, retries: int) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["acme"], max_retries=retries,
                         timeout=30)


def test_a_request_larger_than_the_window_is_a_400_the_sdk_does_not_retry(upstream, gateways):
    import openai

    gw = gateways(priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": 100}],
                                               "on_exhausted": "reject"}))
    with pytest.raises(openai.BadRequestError) as info:
        # 12 x 2 J + 100 x 2 J = 224 J > the whole 100 J window
        sdk(gw, retries=2).chat.completions.create(model="big", messages=HI, max_tokens=100)
    err = info.value
    assert err.status_code == 400 and err.response.headers.get("retry-after") is None
    body = err.body
    assert body["code"] == "budget_exceeds_window" and body["param"] == "max_tokens"
    assert body["type"] == "invalid_request_error"
    # (100 J - 12 x 2 J) / 2 J per output token = 38
    assert "largest max_tokens that fits is 38" in body["message"]
    assert "1d window" in body["message"]
    assert requests_seen(gw) == 1  # the SDK sent it once
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'joulegate_budget_rejections_total{reason="exceeds_window",tenant="acme"} 1.0' in metrics

    # The largest max_tokens the message names is served.
    ok = sdk(gw, retries=0).chat.completions.create(model="big", messages=HI, max_tokens=38)
    assert ok.usage.completion_tokens == 12


def test_degrading_tenant_is_told_the_best_tier_and_size_that_fit(upstream, gateways):
    import openai

    gw = gateways(priced_policy(upstream.url, {"budgets": [{"window": "1h", "joules": 30}]}))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw, retries=2).chat.completions.create(model="big", messages=HI, max_tokens=100)
    # big: (30 - 24) / 2 = 3 tokens; small: (30 - 12) / 1 = 18 tokens: small is better
    assert "largest max_tokens that fits is 18" in info.value.body["message"]
    assert "tier 'small'" in info.value.body["message"]
    assert requests_seen(gw) == 1


def test_a_request_that_fits_later_gets_429_with_retry_after_at_the_window_reset(upstream,
                                                                                 gateways):
    import openai

    gw = gateways(priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": 100}],
                                               "on_exhausted": "reject"}))
    client = sdk(gw, retries=0)
    for _ in range(2):  # 2 x (12 + 12 tokens x 2 J) = 96 J spent
        client.chat.completions.create(model="big", messages=HI, max_tokens=12)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="big", messages=HI, max_tokens=12)
    retry_after = int(info.value.response.headers["retry-after"])
    day_end = (int(time.time()) // 86400 + 1) * 86400  # the 1d window is a UTC day
    assert abs(retry_after - (day_end - time.time())) <= 5
    assert info.value.body["code"] == "budget_exhausted"
    assert "4.0 J left" in info.value.body["message"]


def test_an_injected_default_max_tokens_is_announced(upstream, gateways):
    gw = gateways(priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": 1000}],
                                               "default_max_tokens": 16}))
    raw = sdk(gw, retries=0).chat.completions.with_raw_response.create(model="big", messages=HI)
    assert raw.headers["x-joulegate-default-max-tokens"] == "16"
    given = sdk(gw, retries=0).chat.completions.with_raw_response.create(
        model="big", messages=HI, max_tokens=12)
    assert "x-joulegate-default-max-tokens" not in given.headers
