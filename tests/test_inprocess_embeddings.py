"""``POST /v1/embeddings`` and ``GET /v1/models/{id}`` in-process, with scripted backends:
the wire format (string and list input, token ids, ``dimensions``, ``encoding_format``
float and base64), invalid bodies, routing only among tiers that serve embeddings (400
naming the missing capability otherwise), budgets charged exactly the joules reported, and
what each model object says it supports.

The scripted backend embeds one prompt token per word; tier ``big`` costs 2 J per token,
``small`` 1 J."""

from __future__ import annotations

import base64
import struct

import pytest

from .conftest import KEYS, key_digest
from .inprocess import UNUSED_UPSTREAM, InProcessGateway, joules, policy
from .scripted import Script, ScriptedBackend, scripted_vector

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

EMBED = "/v1/embeddings"


class MixedGateway(InProcessGateway):
    """Backends of any kind scripted, so that tiers may differ in what they can do."""

    def _build(self, name: str, spec) -> ScriptedBackend:
        backend = ScriptedBackend(name, self.scripts.get(name))
        self.backends[name] = backend
        self.built.append(backend)
        return backend


def mixed_policy(**tenant) -> dict:
    """Tier ``chat`` (llamacpp: no embeddings), tier ``vec`` (wordllama: embeddings only,
    cost 0.1), tier ``big`` (an HTTP upstream: both). Tenant ``acme`` may use all three."""
    priced = {"meter": "estimated", "joules_per_prompt_token": 1.0,
              "joules_per_output_token": 1.0}
    return {
        "version": 1,
        "backends": {
            "llm": {"kind": "llamacpp", "model": "/nonexistent/model.gguf"},
            "vectors": {"kind": "wordllama", "dimensions": 128},
            "up": {"kind": "openai", "base_url": UNUSED_UPSTREAM, "energy": priced},
        },
        "tiers": [{"name": "vec", "backend": "vectors", "model": "wordllama-l2", "cost": 0.1},
                  {"name": "chat", "backend": "llm", "model": "chat-model", "cost": 1.0},
                  {"name": "big", "backend": "up", "model": "big-model", "cost": 2.0}],
        "tenants": {"acme": {"keys": ["sha256:" + key_digest(KEYS["acme"])],
                             "default_tier": "chat", **tenant}},
    }


async def test_a_string_and_a_list_of_strings(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(EMBED, {"model": "small", "input": "the cat sat"},
                          headers={"x-request-id": "emb-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "small-model"
        assert body["data"] == [{"object": "embedding", "index": 0,
                                 "embedding": pytest.approx(scripted_vector("the cat sat", 8))}]
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3,
                                 "energy_joules": joules(3, 0, "small"),
                                 "energy_source": "estimated",
                                 # issue 19: the default site (PUE 1, no water, no carbon)
                                 "facility_joules": joules(3, 0, "small"), "water_ml": 0.0,
                                 "co2_g": 0.0, "site": "default", "co2_source": "none"}
        assert r.headers["x-joulegate-tier"] == "small" and r.headers["x-request-id"] == "emb-1"
        assert float(r.headers["x-joulegate-energy-joules"]) == joules(3, 0, "small")

        r = await gw.post(EMBED, {"model": "big", "input": ["a b", "c d e", "f"],
                                  "dimensions": 4, "user": "u1"})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        assert [len(d["embedding"]) for d in data] == [4, 4, 4]
        assert r.json()["usage"]["prompt_tokens"] == 6
        (seen,) = gw.backends["up-big"].calls.embeddings
        assert seen.model == "big-model" and seen.inputs == ["a b", "c d e", "f"]
        assert seen.dimensions == 4 and seen.user == "u1"


async def test_token_id_input_is_passed_on(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(EMBED, {"model": "small", "input": [1, 2, 3]})
        assert r.status_code == 200, r.text
        r = await gw.post(EMBED, {"model": "small", "input": [[1, 2], [3]]})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2
        assert [e.inputs for e in gw.backends["up-small"].calls.embeddings] == \
            [[[1, 2, 3]], [[1, 2], [3]]]


async def test_base64_is_little_endian_float32_of_the_same_vector(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        body = {"model": "small", "input": ["one two", "three"]}
        floats = (await gw.post(EMBED, body)).json()["data"]
        r = await gw.post(EMBED, {**body, "encoding_format": "base64"})
        assert r.status_code == 200, r.text
        for as_float, as_b64 in zip(floats, r.json()["data"], strict=True):
            raw = base64.b64decode(as_b64["embedding"])
            decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
            assert decoded == pytest.approx(as_float["embedding"], rel=1e-6)
        # The official SDK asks for base64 by default and decodes it to the same floats.
        client = gw.openai()
        result = await client.embeddings.create(model="small", input=["one two", "three"])
        assert [d.embedding for d in result.data] == \
            [pytest.approx(f["embedding"], rel=1e-6) for f in floats]
        assert result.usage.prompt_tokens == 3
        explicit = await client.embeddings.create(model="small", input="one two",
                                                  encoding_format="float", dimensions=5)
        assert len(explicit.data[0].embedding) == 5


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "small"}, "input", "missing_required_parameter"),
    ({"model": "small", "input": ""}, "input", "invalid_value"),
    ({"model": "small", "input": []}, "input", "invalid_value"),
    ({"model": "small", "input": ["ok", ""]}, "input", "invalid_value"),
    ({"model": "small", "input": ["x"] * 2049}, "input", "invalid_value"),
    ({"model": "small", "input": {"text": "x"}}, "input", "invalid_type"),
    ({"model": "small", "input": ["x", 3]}, "input", "invalid_type"),
    ({"model": "small", "input": [[1], []]}, "input", "invalid_type"),
    ({"model": "small", "input": [-1]}, "input", "invalid_type"),
    ({"model": "small", "input": "x", "encoding_format": "int8"}, "encoding_format",
     "invalid_value"),
    ({"model": "small", "input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"model": "small", "input": "x", "dimensions": "8"}, "dimensions", "invalid_type"),
    ({"model": "small", "input": "x", "stream": True}, "stream", "unsupported_parameter"),
    ({"input": "x"}, "model", "missing_required_parameter"),
])
async def test_invalid_bodies_are_400_naming_the_field(tmp_path, body, param, code):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(EMBED, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code), err
        assert not gw.backends["up-small"].calls.embeddings


async def test_auth_and_unknown_model(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(EMBED, {"model": "small", "input": "x"}, who=None)
        assert r.status_code == 401
        r = await gw.post(EMBED, {"model": "nope", "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"


async def test_routed_only_among_tiers_that_serve_embeddings(tmp_path):
    async with MixedGateway(tmp_path, mixed_policy()) as gw:
        # auto: the cheapest tier that serves embeddings, not the tenant's default (chat).
        r = await gw.post(EMBED, {"model": "auto", "input": "hello there"})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "vec"
        assert len(gw.backends["vectors"].calls.embeddings) == 1
        # pinned to a tier that serves embeddings: served there.
        r = await gw.post(EMBED, {"model": "big-model", "input": "hello there"})
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "big"
        # pinned to a tier that cannot: 400 naming the capability and who can.
        r = await gw.post(EMBED, {"model": "chat", "input": "hello there"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing" and err["param"] == "model"
        assert "capability 'embeddings' missing" in err["message"]
        assert "vec, big" in err["message"]
        assert not gw.backends["llm"].calls.embeddings
        # and the other way: chat is never sent to the embeddings-only tier.
        r = await gw.chat(model="vec")
        assert r.status_code == 400
        assert "capability 'generation' missing" in r.json()["error"]["message"]
        r = await gw.chat(model="auto")
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "chat"
        assert not gw.backends["vectors"].requests


async def test_a_tenant_without_an_embedding_tier_gets_400(tmp_path):
    p = mixed_policy(tiers=["chat"], default_tier="chat")
    async with MixedGateway(tmp_path, p) as gw:
        r = await gw.post(EMBED, {"model": "auto", "input": "x"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing"
        assert "capability 'embeddings' missing" in err["message"]


async def test_budget_is_charged_exactly_the_reported_joules(tmp_path):
    budget = policy({"budgets": [{"window": "1d", "joules": 1000}]})
    async with InProcessGateway(tmp_path, budget) as gw:
        reported = []
        for text in ("one two three", ["four five", "six"]):
            r = await gw.post(EMBED, {"model": "big", "input": text})
            assert r.status_code == 200, r.text
            reported.append(r.json()["usage"]["energy_joules"])
        assert reported == [joules(3, 0, "big"), joules(3, 0, "big")]
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == pytest.approx(sum(reported), abs=1e-6)
        assert window["reserved_joules"] == 0
        assert "x-joulegate-default-max-tokens" not in r.headers  # no output tokens reserved
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            pytest.approx(sum(reported), abs=1e-6)
        assert await gw.metric("joulegate_requests_total", tenant="acme", tier="big",
                               status="200") == 2


async def test_a_request_larger_than_the_budget_is_refused_before_the_backend(tmp_path):
    tight = policy({"budgets": [{"window": "1d", "joules": 10}], "on_exhausted": "reject"})
    async with InProcessGateway(tmp_path, tight) as gw:
        r = await gw.post(EMBED, {"model": "big", "input": "x" * 400})  # ~101 tokens x 2 J
        assert r.status_code == 400 and r.json()["error"]["code"] == "budget_exceeds_window"
        assert not gw.backends["up-big"].calls.embeddings


async def test_a_backend_failure_falls_back_like_a_generation(tmp_path):
    p = policy(routing={"fallback": "all"})
    scripts = {"up-big": Script.unavailable()}
    async with InProcessGateway(tmp_path, p, scripts) as gw:
        r = await gw.post(EMBED, {"model": "big", "input": "x y"})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert r.headers["x-joulegate-fallback"] == "big->small"


async def test_models_say_what_each_tier_supports(tmp_path):
    async with MixedGateway(tmp_path, mixed_policy()) as gw:
        listed = (await gw.http.get("/v1/models", headers=_auth())).json()["data"]
        by_id = {m["id"]: m for m in listed}
        assert by_id["vec"]["capabilities"] == {
            "chat": False, "completions": False, "embeddings": True, "streaming": False,
            "tools": False, "structured_output": False, "insertion": False}
        assert by_id["chat"]["capabilities"]["chat"] is True
        assert by_id["chat"]["capabilities"]["embeddings"] is False
        assert by_id["big-model"]["capabilities"]["embeddings"] is True
        assert by_id["auto"]["capabilities"]["embeddings"] is True
        assert by_id["auto"]["capabilities"]["chat"] is True

        r = await gw.http.get("/v1/models/vec", headers=_auth())
        assert r.status_code == 200 and r.json() == by_id["vec"]
        r = await gw.http.get("/v1/models/nope", headers=_auth())
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
        r = await gw.http.get("/v1/models/vec")
        assert r.status_code == 401
        # The official SDK's models.retrieve reads the same object.
        model = await gw.openai().models.retrieve("wordllama-l2")
        assert model.id == "wordllama-l2" and model.model_extra["tier"] == "vec"


async def test_model_ids_with_a_slash(tmp_path):
    p = policy()
    p["tiers"][0]["model"] = "org/big-model"
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.http.get("/v1/models/org/big-model", headers=_auth())
        assert r.status_code == 200 and r.json()["tier"] == "big"


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS['acme']}"}
