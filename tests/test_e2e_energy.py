"""End to end with the real llama.cpp tier: energy in usage, headers, metrics and calibration."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KEYS, Gateway, access_records, llamacpp_policy, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def scrape(gw: Gateway) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, small_model_path):
    work = tmp_path_factory.mktemp("energy")
    policy = llamacpp_policy()
    policy["state_dir"] = str(work / "state")
    policy["backends"]["q05"]["energy"] = {"meter": "auto", "watts_per_core": 10.0,
                                           "idle_watts": 2.0, "interval_s": 0.2}
    gateway = Gateway(policy, work).start()
    yield gateway
    gateway.stop()


def test_energy_is_reported_and_exported(gw):
    client = gw.client()
    before = scrape(gw)
    reported = 0.0
    tokens = {"prompt": 0, "completion": 0}
    for max_tokens in (4, 8):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=HELLO, max_tokens=max_tokens, temperature=0)
        resp = raw.parse()
        usage = resp.usage.model_dump()
        assert usage["energy_source"] == "estimated"  # no GPU, no RAPL on this machine
        assert usage["energy_joules"] > 0
        assert raw.headers["x-joulegate-energy-joules"] == f"{usage['energy_joules']:.6f}"
        assert raw.headers["x-joulegate-energy-source"] == "estimated"
        reported += usage["energy_joules"]
        tokens["prompt"] += usage["prompt_tokens"]
        tokens["completion"] += usage["completion_tokens"]
    chunks = list(client.chat.completions.create(
        model="auto", messages=HELLO, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    final = chunks[-1].usage.model_dump()
    assert final["energy_joules"] > 0 and final["energy_source"] == "estimated"
    reported += final["energy_joules"]
    tokens["prompt"] += final["prompt_tokens"]
    tokens["completion"] += final["completion_tokens"]

    after = scrape(gw)
    labels = {"tenant": "acme", "tier": "small"}
    gained = (value(after, "joulegate_energy_joules_total", source="estimated", **labels)
              - value(before, "joulegate_energy_joules_total", source="estimated", **labels))
    assert gained == pytest.approx(reported, abs=3 * 1e-6)  # responses round to 1e-6 J
    for kind, count in tokens.items():
        assert (value(after, "joulegate_tokens_total", kind=kind, **labels)
                - value(before, "joulegate_tokens_total", kind=kind, **labels)) == count
    assert (value(after, "joulegate_requests_total", status="200", **labels)
            - value(before, "joulegate_requests_total", status="200", **labels)) == 3
    assert (value(after, "joulegate_joules_per_token_count", tier="small")
            - value(before, "joulegate_joules_per_token_count", tier="small")) == 3
    assert value(after, "joulegate_time_to_first_token_seconds_count", tier="small") >= 1
    assert value(after, "joulegate_power_watts", backend="host-cpu", device="cpu") > 0


def test_idle_energy_and_bounded_labels(gw):
    httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "auto", "messages": HELLO},
               headers={"authorization": "Bearer sk-unknown"})
    wait_until(lambda: value(scrape(gw), "joulegate_idle_energy_joules_total",
                             backend="host-cpu") > 0.5, 10, 0.2, "idle energy")
    samples = scrape(gw)
    assert value(samples, "joulegate_requests_total", tenant="other", tier="other",
                 status="401") >= 1
    tenants = {dict(labels).get("tenant") for (_, labels) in samples if dict(labels).get("tenant")}
    assert tenants <= {"acme", "globex", "other"}


def test_failed_and_abandoned_requests_are_still_charged(gw):
    before = value(scrape(gw), "joulegate_energy_joules_total", tenant="acme", tier="small",
                   source="estimated")
    body = {"model": "auto", "messages": HELLO, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as resp:
        for line in resp.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    wait_until(lambda: '"status":499' in gw.log(), 20, what="abandoned request logged")
    line = next(r for r in access_records(gw.log()) if r["status"] == 499)
    assert line["energy_joules"] > 0 and line["completion_tokens"] >= 1
    after = value(scrape(gw), "joulegate_energy_joules_total", tenant="acme", tier="small",
                  source="estimated")
    assert after - before == pytest.approx(line["energy_joules"], abs=1e-6)


def test_calibration_is_persisted_and_printed(tmp_path, small_model_path):
    policy = llamacpp_policy()
    policy["state_dir"] = str(tmp_path / "state")
    gw = Gateway(policy, tmp_path).start()
    try:
        for n in (3, 6, 9):
            gw.client().chat.completions.create(model="auto", messages=HELLO, max_tokens=n)
    finally:
        gw.stop()  # saves the table at shutdown
    saved = json.loads((tmp_path / "state" / "calibration.json").read_text())
    assert saved["tiers"]["small"]["n"] == pytest.approx(3, rel=0.02)
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "energy", "--policy",
                          str(gw.policy_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("small "))
    assert float(row.split()[3]) == pytest.approx(3, rel=0.02)  # effective requests


def test_metrics_merge_across_workers(tmp_path, small_model_path):
    gw = Gateway(llamacpp_policy(), tmp_path, workers=2).start()
    try:
        wait_until(lambda: gw.log().count("Application startup complete") == 2, 120, 0.2,
                   "both workers")
        reported = 0.0
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            with httpx.Client() as client:
                resp = client.post(f"{gw.url}/v1/chat/completions", timeout=60,
                                   headers={"authorization": f"Bearer {KEYS['acme']}"},
                                   json={"model": "auto", "messages": HELLO, "max_tokens": 2})
            assert resp.status_code == 200
            reported += resp.json()["usage"]["energy_joules"]
        ids = {r["request_id"] for r in access_records(gw.log())}
        assert len(ids) == 6  # every worker writes its access log
        for _ in range(3):  # every scrape, whichever worker answers it, sees all six
            samples = scrape(gw)
            assert value(samples, "joulegate_requests_total", tenant="acme", tier="small",
                         status="200") == 6
            assert value(samples, "joulegate_energy_joules_total", tenant="acme", tier="small",
                         source="estimated") == pytest.approx(reported, abs=6e-6)
    finally:
        gw.stop()
