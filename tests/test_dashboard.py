"""The Grafana dashboard and the alert rules, proved against a real Prometheus.

- Structure (unit): variables, units, and every metric a panel reads is one the gateway
  exports (or a recording rule of the shipped rules file).
- Rules (promtool): ``promtool check rules`` and the unit tests in tests/prometheus/.
- Truth: a real gateway (two real llama.cpp tiers on the Qwen 0.5B GGUF and one upstream
  that is down) serves two tenants; a real Prometheus scrapes it every second and loads the
  rules; every panel's every query, with the variables substituted as Grafana does, must
  return at least one series, and the alerts that the traffic provokes must be active.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import yaml

from gateway.metrics import Metrics
from policies import key_digest

from .conftest import ADMIN_KEY, SMALL_MODEL, answers_ok, free_port, tenant, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "joulegate" / "dashboards" / "joulegate.json"
RULES = ROOT / "helm" / "joulegate" / "files" / "alerts.yaml"
RULE_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*_test.yaml"))
RENDER = ROOT / "scripts" / "render_dashboard.py"
UNITS = {"watt", "joule", "s", "percentunit", "reqps", "none", "massg", "litre"}
#: What the operators asked the dashboard to show (issue 7), by panel title.
REQUIRED_PANELS = [
    "Power per backend", "Joules per output token, per tier", "Energy per tenant",
    "Budget remaining", "Route decisions by tier and reason", "Capacity fraction",
    "Request rate", "Error rate", "Latency percentiles", "Time to first token percentiles",
    "Idle energy share", "Estimated vs measured energy",
    # issue 19: facility energy, water and carbon
    "Carbon intensity and served load", "Facility vs IT power", "CO2 per tenant and site, dashboard range",
    "Water per tenant, dashboard range",
    # issue 18: the cascade's escalations and the capacity's holds
    "Cascade escalations and capacity holds",
]

sys.path.insert(0, str(ROOT / "scripts"))
from render_dashboard import panels, substitute  # noqa: E402

del sys.path[0]

if TYPE_CHECKING:
    import openai


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_series() -> set[str]:
    """Every series name the gateway's metrics can produce, with the type suffixes."""
    names = set()
    for metric in vars(Metrics()).values():
        for family in getattr(metric, "describe", list)():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def recorded_series() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


# -- structure --------------------------------------------------------------------------

@pytest.mark.unit
def test_dashboard_variables_units_and_panels():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("tenant", "tier"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    titles = [p["title"] for p in panels(dash)]
    assert all(t in titles for t in REQUIRED_PANELS), set(REQUIRED_PANELS) - set(titles)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dash):
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.unit
def test_every_queried_metric_is_exported():
    known = exported_series() | recorded_series()
    queried = set()
    texts = [t["expr"] for p in panels(dashboard()) for t in p["targets"]]
    texts += [v["query"]["query"] for v in dashboard()["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    rules = yaml.safe_load(RULES.read_text())["groups"]
    texts += [r["expr"] for g in rules for r in g["rules"]]
    for text in texts:
        queried |= set(re.findall(r"\b(?:[a-z]+:)?joulegate_[a-z0-9_]+(?::[a-z0-9_]+)?", text))
    assert queried, "no metric found in the dashboard"
    assert queried <= known, f"not exported by the gateway: {sorted(queried - known)}"


@pytest.mark.unit
def test_substitution_matches_grafana_variable_syntax():
    expr = 'rate(x{tenant=~"$tenant",tier=~"${tier}"}[$__rate_interval])'
    out = substitute(expr, {"tenant": "a|b", "tier": ".*", "__rate_interval": "1m"})
    assert out == 'rate(x{tenant=~"a|b",tier=~".*"}[1m])'


# -- rules --------------------------------------------------------------------------------

def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: scripts/test installs Debian's prometheus")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)


@pytest.mark.e2e
@pytest.mark.ops
def test_alert_rules_check_and_unit_tests_pass():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(RULE_TESTS) >= 2
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


# -- truth: a real gateway, a real Prometheus ----------------------------------------------

class Prometheus:
    """Debian's prometheus on a loopback port, scraping one target every second."""

    def __init__(self, target: str, workdir: Path):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus is missing: scripts/test installs Debian's prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(RULES, workdir / "alerts.yaml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yaml"],
            "scrape_configs": [{"job_name": "joulegate", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(workdir / "prometheus.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [exe, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: answers_ok(self.proc, f"{self.url}/-/ready", "prometheus"), 60, 0.2,
                   "prometheus to be ready")

    def api(self, path: str, **params) -> object:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def truth_policy(dead_port: int) -> dict:
    """Tiers small and big (each its own llama.cpp backend on the real 0.5B model) and
    remote (an upstream nobody listens on). globex has a small hourly budget."""
    def llama():
        return {"kind": "llamacpp", "model": SMALL_MODEL, "n_ctx": 1024, "slots": 1,
                "n_threads": 2, "queue_timeout_s": 120, "energy": {"idle_watts": 3.0}}

    return {
        "version": 1,
        "server": {"health_interval_s": 1},
        "admin": {"keys": ["sha256:" + key_digest(ADMIN_KEY)]},
        # Sites (issue 19): the carbon panels need an intensity and CO2 to show.
        "sites": {"lab": {"pue": 1.3, "wue_l_per_kwh": 1.8,
                          "carbon": {"schedule": {0: 320.0, 12: 180.0}}}},
        "backends": {
            "q-small": {**llama(), "site": "lab"}, "q-big": {**llama(), "site": "lab"},
            "dead": {"kind": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1",
                     "timeouts": {"connect_s": 1, "first_byte_s": 2, "total_s": 5}},
        },
        "tiers": [
            {"name": "small", "backend": "q-small", "model": "qwen-small", "cost": 1,
             "joules_per_prompt_token": 0.01, "joules_per_output_token": 0.5},
            # A pessimistic seed: a pinned big request does not fit globex's budget.
            {"name": "big", "backend": "q-big", "model": "qwen-big", "cost": 2,
             "joules_per_prompt_token": 0.05, "joules_per_output_token": 10.0},
            {"name": "remote", "backend": "dead", "model": "remote-model", "cost": 3},
        ],
        "routing": {"estimator": "heuristic", "thresholds": {"big": 0.3},
                    "capacity": {"big": {"fraction": 0.5, "by": "requests", "window_s": 300}},
                    "fallback": "all"},
        "tenants": {
            "acme": tenant("acme", default_tier="small",
                           budgets=[{"window": "1d", "joules": 1.0e6, "soft_pct": 80}]),
            "globex": tenant("globex", default_tier="small", on_exhausted="degrade",
                             budgets=[{"window": "1h", "joules": 40, "soft_pct": 50}]),
            # The cascade panel: every probe wants big (threshold 1), the capacity lets the
            # first through (a young window's burst) and holds the next (over half).
            "initech": tenant("initech", default_tier="small", routing={
                "estimator": "cascade",
                "cascade": {"threshold": 1.0, "probe_tokens": 2, "to": "big"}}),
        },
    }


EASY = "Say hi."
HARD = ("Prove step by step that the loop terminates, then derive its complexity. "
        "Statement 1 | every call shrinks the input. Statement 2 | the invariant holds.\n"
        "```python\ndef f(xs):\n    return sorted(xs)[::2]\n```\n")


def chat(client: openai.OpenAI, prompt: str, model: str = "auto", stream: bool = False):
    messages = [{"role": "user", "content": prompt}]
    if stream:
        with client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                            stream=True) as events:
            return list(events)
    return client.chat.completions.create(model=model, messages=messages, max_tokens=6)


def send_traffic(gw) -> None:
    import openai

    globex, acme = gw.client("globex"), gw.client("acme")
    # globex: a pinned big request its budget cannot take degrades to small, then requests
    # until the budget refuses them (429).
    chat(globex, EASY, model="big")
    refused = False
    for i in range(30):
        try:
            chat(globex, HARD if i % 2 else EASY, stream=bool(i % 3 == 0))
        except openai.RateLimitError:
            refused = True
            break
    assert refused, "globex's 40 J budget never ran out"
    # acme: routed easy and hard prompts, streamed and not, a pinned request to the tier that
    # is down (falls back), and one bad request.
    for i in range(8):
        chat(acme, HARD if i % 2 else EASY, stream=bool(i % 2 == 0))
    chat(acme, EASY, model="remote")
    initech = gw.client("initech")
    for prompt in (EASY, HARD, EASY):
        chat(initech, prompt)
    with pytest.raises(openai.BadRequestError):
        acme.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}],
                                     max_tokens=-1)


@pytest.mark.ops
@pytest.mark.e2e
def test_every_panel_shows_data_from_a_real_prometheus(gateways, prometheus_for, tmp_path,
                                                        small_model_path):
    gw = gateways(truth_policy(free_port()))
    prom = prometheus_for(gw.url.removeprefix("http://"))
    wait_until(lambda: prom.query('up{job="joulegate"} == 1'), 30, 0.5, "the first scrape")
    send_traffic(gw)
    time.sleep(3)  # a few more scrapes after the last request

    # Grafana's substitution: three tenants chosen, every tier, a 1-minute rate window.
    variables = {"tenant": "acme|globex|initech", "tier": ".*", "__rate_interval": "1m",
                 "__interval": "1m", "__range": "10m"}
    empty = []
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            if not prom.query(expr):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # The variables' own queries list both tenants and the tiers that served.
    tenants = prom.api("label/tenant/values", **{"match[]": "joulegate_requests_total"})
    assert {"acme", "globex"} <= set(tenants)
    assert {"small", "big"} <= set(prom.api("label/tier/values",
                                            **{"match[]": "joulegate_requests_total"}))

    # The numbers mean what the panels say.
    def values(expr: str) -> dict[str, float]:
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                for r in prom.query(expr)}

    jpt = values(substitute(panel_expr("Joules per output token, per tier"), variables))
    assert all(v > 0 for v in jpt.values())
    per_tenant = prom.query('sum by (tenant) (joulegate_energy_joules_total)')
    assert {r["metric"]["tenant"] for r in per_tenant} >= {"acme", "globex"}
    up = {r["metric"]["backend"]: r["value"][1] for r in prom.query("joulegate_backend_up")}
    assert up == {"q-small": "1", "q-big": "1", "dead": "0"}
    sources = prom.query('sum by (source) (joulegate_energy_joules_total)')
    assert {r["metric"]["source"] for r in sources} == {"estimated"}  # no GPU, no RAPL here

    # The alerts this traffic provokes are active (pending while their `for:` runs).
    def active() -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("tenant") or a["labels"].get("backend"))
                for a in prom.api("alerts")["alerts"]}

    expected = {("JoulegateTenantRejected", "globex"), ("JoulegateBudgetSoftThreshold", "globex"),
                ("JoulegateBackendDown", "dead")}
    wait_until(lambda: expected <= active(), 20, 0.5, f"alerts {expected}")
    assert not {a for a in active() if a[1] == "acme"}  # acme is far from its budget

    out = Path(os.environ.get("JOULEGATE_DASHBOARD_PNG", tmp_path / "dashboard.png"))
    rendered = subprocess.run([sys.executable, str(RENDER), "--prometheus", prom.url, "--out",
                               str(out), "--minutes", "2"], capture_output=True, text=True,
                              timeout=120, check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert out.stat().st_size > 20_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def panel_expr(title: str) -> str:
    (panel,) = [p for p in panels(dashboard()) if p["title"] == title]
    return panel["targets"][0]["expr"]
