"""Embeddings end to end: real ``joulegate serve`` processes, the real WordLlama model from
its PyPI package, the official ``openai`` SDK and LangChain's ``OpenAIEmbeddings``.

Gateway ``local`` serves tier ``embed`` in-process (``kind: wordllama``), next to the
embedded default's own embedding tier. Gateway ``relay`` has no model: its tier ``remote``
is an ``openai`` backend whose upstream is ``local``'s ``/v1`` (a real OpenAI-compatible
HTTP server), so the same requests also go through ``POST {base_url}/embeddings``.

``OpenAIEmbeddings`` is used with ``check_embedding_ctx_length=False``: with the check on,
it first tokenises every text with tiktoken (whose encoding files download on first use,
which nothing may do here) and sends token ids, which an embedding model with its own
tokenizer cannot read; with it off it sends the texts themselves."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

from .conftest import KEYS, key_digest, tenant

pytestmark = pytest.mark.e2e

pytest.importorskip("wordllama")

CAT = "The cat sat on the mat."
KITTEN = "A kitten is resting on the rug."
MARKET = "The stock market fell sharply today."


def local_policy() -> dict:
    return {
        "version": 1,
        "backends": {"vectors": {"kind": "wordllama"}},
        "tiers": [{"name": "embed", "backend": "vectors", "model": "wordllama-l2-supercat",
                   "cost": 0.01, "joules_per_prompt_token": 0.0005,
                   "joules_per_output_token": 0.0}],
        "tenants": {"acme": tenant("acme", default_tier="embed",
                                   budgets=[{"window": "1d", "joules": 1_000_000}])},
    }


def relay_policy(upstream: str) -> dict:
    return {
        "version": 1,
        "backends": {"up": {"kind": "openai", "base_url": f"{upstream}/v1",
                            "api_key": KEYS["acme"],
                            "energy": {"meter": "estimated", "joules_per_prompt_token": 0.01,
                                       "joules_per_output_token": 0.01}}},
        "tiers": [{"name": "remote", "backend": "up", "model": "embed", "cost": 1.0,
                   "joules_per_prompt_token": 0.01, "joules_per_output_token": 0.01}],
        "tenants": {"acme": {"keys": ["sha256:" + key_digest(KEYS["acme"])],
                             "default_tier": "remote"}},
    }


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from .conftest import Gateway

    local = Gateway(local_policy(), tmp_path_factory.mktemp("local")).start()
    relay = Gateway(relay_policy(local.url), tmp_path_factory.mktemp("relay"))
    try:
        relay.start()
        yield local, relay
    finally:
        relay.stop()
        local.stop()


@pytest.mark.parametrize("which", ["local", "relay"])
def test_openai_sdk_float_and_base64(pair, which):
    gw = dict(zip(("local", "relay"), pair, strict=True))[which]
    model = "embed" if which == "local" else "remote"
    client = gw.client()
    result = client.embeddings.create(model=model, input=[CAT, KITTEN, MARKET],
                                      encoding_format="float")
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [256, 256, 256]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)  # unit length
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.1
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[1], vectors[2]) + 0.1
    assert result.usage.prompt_tokens > 0
    # The SDK's default is base64, which it decodes: the same floats.
    decoded = client.embeddings.create(model=model, input=[CAT, KITTEN, MARKET])
    assert [d.embedding for d in decoded.data] == [pytest.approx(v, abs=1e-6) for v in vectors]
    # Matryoshka: the first 64 dimensions, renormalised.
    short = client.embeddings.create(model=model, input=CAT, dimensions=64,
                                     encoding_format="float").data[0].embedding
    assert len(short) == 64
    norm = sum(x * x for x in vectors[0][:64]) ** 0.5
    assert short == pytest.approx([x / norm for x in vectors[0][:64]], abs=1e-5)


def test_raw_response_carries_energy_and_base64_is_float32_le(pair):
    local, _ = pair
    r = httpx.post(f"{local.url}/v1/embeddings", timeout=60,
                   headers={"authorization": f"Bearer {KEYS['acme']}"},
                   json={"model": "auto", "input": CAT, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "wordllama-l2-supercat"
    assert body["usage"]["energy_source"] in ("measured", "estimated")
    assert body["usage"]["energy_joules"] >= 0
    assert r.headers["x-joulegate-tier"] == "embed"
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(struct.unpack("<256f", raw)) == 256
    # More dimensions than the model has: 400 naming the parameter.
    r = httpx.post(f"{local.url}/v1/embeddings", timeout=60, json={"model": "embed",
                   "input": "x", "dimensions": 300},
                   headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


def test_langchain_openai_embeddings(pair):
    from langchain_openai import OpenAIEmbeddings

    for gw, model in zip(pair, ("embed", "remote"), strict=True):
        emb = OpenAIEmbeddings(model=model, base_url=f"{gw.url}/v1", api_key=KEYS["acme"],
                               check_embedding_ctx_length=False, max_retries=0)
        docs = emb.embed_documents([CAT, KITTEN, MARKET])
        query = emb.embed_query("a small cat lying on a carpet")
        assert len(docs) == 3 and len(query) == 256
        assert cosine(query, docs[0]) > cosine(query, docs[2])
        assert cosine(docs[0], docs[1]) > cosine(docs[0], docs[2])


def test_models_list_what_each_tier_supports(pair):
    local, relay = pair
    model = local.client().models.retrieve("embed")
    assert model.model_extra["capabilities"]["embeddings"] is True
    assert model.model_extra["capabilities"]["chat"] is False
    r = local.client().chat.completions.with_raw_response  # chat on an embeddings-only tier
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        r.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    assert "capability 'generation' missing" in str(info.value)
    remote = relay.client().models.retrieve("remote")
    assert remote.model_extra["capabilities"]["embeddings"] is True
