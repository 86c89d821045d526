"""Policy reload on the admin endpoint and on SIGHUP: atomic, and a bad file is refused."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from .conftest import ADMIN_KEY, KEYS, SMALL_MODEL_ID, Gateway, llamacpp_policy, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _works(gw: Gateway, who: str, model: str = "auto") -> bool:
    resp = httpx.post(f"{gw.url}/v1/chat/completions", headers=_auth(KEYS[who]), timeout=60,
                      json={"model": model, "messages": HELLO, "max_tokens": 1})
    return resp.status_code == 200


@pytest.fixture
def gw(tmp_path, small_model_path):
    gateway = Gateway(llamacpp_policy(), tmp_path).start()
    yield gateway
    gateway.stop()


def test_admin_reload_is_atomic_and_in_flight_requests_finish_on_the_old_policy(gw):
    assert httpx.post(f"{gw.url}/admin/reload", headers=_auth(KEYS["acme"])).status_code == 401
    assert httpx.post(f"{gw.url}/admin/reload").status_code == 401

    new = llamacpp_policy()
    del new["tenants"]["globex"]
    new["tiers"][0]["model"] = "renamed-model"
    new["backends"]["q05"]["max_queue"] = 9  # changed settings: a fresh backend replaces q05
    body = {"model": "auto", "messages": HELLO, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=120,
                      headers=_auth(KEYS["acme"])) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        gw.write_policy(new)
        resp = httpx.post(f"{gw.url}/admin/reload", headers=_auth(ADMIN_KEY), timeout=120)
        assert resp.status_code == 200 and resp.json()["policy_version"] == 2
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]"
    assert {e["model"] for e in events} == {SMALL_MODEL_ID}  # served start to end by the old policy
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    assert not _works(gw, "globex")
    assert _works(gw, "acme", "renamed-model") and not _works(gw, "acme", SMALL_MODEL_ID)
    wait_until(lambda: "backend 'q05' closed after reload" in gw.log(), 30, what="old backend close")
    assert gw.log().count("backend 'q05' (llamacpp) started") == 2


def test_unchanged_backends_are_reused(gw):
    new = llamacpp_policy()
    new["tenants"]["globex"]["default_tier"] = "small"
    new["server"]["max_body_bytes"] = 8192
    gw.write_policy(new)
    resp = httpx.post(f"{gw.url}/admin/reload", headers=_auth(ADMIN_KEY), timeout=60)
    assert resp.status_code == 200
    assert gw.log().count("backend 'q05' (llamacpp) started") == 1
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1}
    assert httpx.post(f"{gw.url}/v1/chat/completions", json=big, headers=_auth(KEYS["acme"]),
                      timeout=60).status_code == 200  # the new limit applies


def test_bad_reload_is_refused_and_the_old_policy_keeps_serving(gw):
    bad = llamacpp_policy()
    bad["tiers"][0]["backend"] = "missing"
    gw.write_policy(bad)
    resp = httpx.post(f"{gw.url}/admin/reload", headers=_auth(ADMIN_KEY))
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "invalid_policy" and "tiers[0].backend: unknown backend 'missing'" in err["message"]
    assert _works(gw, "acme") and _works(gw, "globex")

    gw.policy_path.write_text("version: [")  # SIGHUP with a broken file
    gw.signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP reload refused" in gw.log(), 30, what="refused SIGHUP reload")
    assert _works(gw, "acme")


def test_sighup_reload(gw):
    new = llamacpp_policy()
    del new["tenants"]["acme"]
    gw.write_policy(new)
    gw.signal(signal.SIGHUP)
    wait_until(lambda: not _works(gw, "acme"), 30, what="SIGHUP reload")
    assert _works(gw, "globex")
    assert "policy reloaded" in gw.log()
