"""End to end: the official openai SDK against a real gateway serving the real Qwen 0.5B."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import ADMIN_KEY, KEYS, SMALL_MODEL_ID, access_records, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def test_chat_non_streaming(gateway):
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, max_tokens=8, temperature=0)
    assert raw.headers["x-joulegate-tier"] == "small"
    resp = raw.parse()
    assert resp.object == "chat.completion" and resp.model == SMALL_MODEL_ID
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"  # 8 tokens cannot finish this answer
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_streaming_counts_the_same_tokens_as_non_streaming(gateway):
    client = gateway.client()
    # llama.cpp reuses the KV cache of a repeated prompt, which changes the logits slightly:
    # compare two runs that start from the same cache state (the prompt already cached).
    client.chat.completions.create(model="small", messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(model="small", messages=HELLO, max_tokens=12,
                                           temperature=0, seed=1)
    chunks = list(client.chat.completions.create(
        model="small", messages=HELLO, max_tokens=12, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3  # token by token, not one blob
    assert "".join(texts) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_is_incremental(gateway):
    """The first chunk reaches the client while the model is still generating."""
    body = {"model": "auto", "messages": HELLO, "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        contents = 0
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                contents += 1
                break
        assert contents == 1
        assert gateway.backend_info("q05")["busy"] == 1  # generation still running
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


def test_text_completion(gateway):
    for _ in range(2):  # the second run starts, like the stream below, with the prompt cached
        resp = gateway.client().completions.create(model=SMALL_MODEL_ID, prompt="def add(a, b):",
                                                   max_tokens=6, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage.completion_tokens == 6 and resp.usage.prompt_tokens >= 5
    streamed = list(gateway.client().completions.create(
        model=SMALL_MODEL_ID, prompt="def add(a, b):", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text
    assert streamed[-1].usage.completion_tokens == 6


def test_fill_in_the_middle(gateway):
    """``suffix``: Qwen2.5-Coder fills the gap between the prompt and the suffix (its FIM
    tokens), whole and streamed alike; the suffix is read as part of the prompt."""
    client = gateway.client()
    ask = {"model": SMALL_MODEL_ID, "prompt": "def add(a, b):\n    return ", "max_tokens": 8,
           "temperature": 0}
    suffix = "\n\n\nprint(add(1, 2))\n"
    plain = client.completions.create(**ask)
    filled = client.completions.create(**ask, suffix=suffix)
    assert filled.choices[0].text.startswith("a + b"), filled.choices[0].text
    # The suffix's tokens and the three FIM tokens are in the prompt.
    assert filled.usage.prompt_tokens >= plain.usage.prompt_tokens + 3 + 5
    streamed = list(client.completions.create(**ask, suffix=suffix, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == filled.choices[0].text
    assert streamed[-1].usage.prompt_tokens == filled.usage.prompt_tokens
    # The client's text cannot write a control token: a suffix spelling one is only text.
    spelled = client.completions.create(**ask, suffix="<|fim_middle|>")
    assert spelled.usage.prompt_tokens > plain.usage.prompt_tokens + 3 + 1


def test_models_list(gateway):
    ids = [m.id for m in gateway.client().models.list()]
    assert ids == ["auto", "small", SMALL_MODEL_ID]


def test_authentication_errors(gateway):
    import openai

    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0
                      ).chat.completions.create(model="auto", messages=HELLO)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key" and "sk-wrong" not in str(info.value.body)
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "auto", "messages": HELLO})
    assert resp.status_code == 401 and resp.json()["error"]["message"].startswith("missing API key")
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    assert "sk-wrong" not in gateway.log()


def test_invalid_requests(gateway):
    import openai

    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=HELLO, tools=[
            {"type": "custom", "custom": {"name": "f"}}])
    assert info.value.body["param"] == "tools[0].type" and info.value.body["code"] == "unsupported_value"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=HELLO, n=3)
    assert info.value.body["param"] == "n"
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{nope",
                      headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert resp.status_code == 400
    assert resp.json() == {"error": {"message": "the request body is not valid JSON",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_json"}}


def test_prompt_longer_than_context_is_a_400(gateway):
    # Qwen tokenizes digits one by one: 3000 digits fit the 4 KiB body limit but not n_ctx=2048.
    body = {"model": "auto", "prompt": "7" * 3000, "max_tokens": 4}
    resp = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    # As OpenAI answers it, so that clients recognise it (LiteLLM's ContextWindowExceeded).
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("This model's maximum context length is 2048 tokens. "
                                     "However, your prompt resulted in 300")


def test_body_too_large(gateway):
    import openai

    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]}
    headers = {"authorization": f"Bearer {KEYS['acme']}"}
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=big, headers=headers)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies while reading
        yield json.dumps(big).encode()

    resp = httpx.post(f"{gateway.url}/v1/chat/completions", content=chunked(), headers=headers)
    assert resp.status_code == 413
    with pytest.raises(openai.APIStatusError) as info:
        gateway.client().chat.completions.create(**big)
    assert info.value.status_code == 413


def test_unknown_path_and_method(gateway):
    resp = httpx.get(f"{gateway.url}/v1/nothing")
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{gateway.url}/v1/chat/completions").status_code == 405


def test_client_disconnect_frees_the_slot(gateway):
    body = {"model": "auto", "messages": HELLO, "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as resp:
        lines = resp.iter_lines()  # kept: dropping it would close the connection here
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        assert gateway.backend_info("q05")["busy"] == 1
    # Closed after one token of 1500: the slot must come back long before generation would end.
    wait_until(lambda: gateway.backend_info("q05")["busy"] == 0, timeout=30, what="slot release")
    resp = gateway.client().chat.completions.create(model="auto", messages=HELLO, max_tokens=2)
    assert resp.usage.completion_tokens == 2
    wait_until(lambda: '"status":499' in gateway.log(), timeout=10, what="access log line")


def test_health_and_readiness(gateway):
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["status"] == "ready" and ready["backends"]["q05"]["ok"] is True


def test_access_log_has_no_prompt_or_key(gateway):
    gateway.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "secret-canary-42"}], max_tokens=1)
    log = gateway.log()
    lines = access_records(log)
    assert lines and lines[-1]["tenant"] == "acme" and lines[-1]["completion_tokens"] == 1
    assert "secret-canary-42" not in log and KEYS["acme"] not in log and ADMIN_KEY not in log
