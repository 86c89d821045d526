"""Sites (issue 19): facility energy, water and CO₂ of every request, labelled with their
sources; exposed in usage (whole and streamed), headers, metrics and the usage log; budgets
in facility kWh, litres and gCO₂ that stay exact; carbon-aware routing.

The in-process tiers of :func:`tests.inprocess.policy` cost exactly 2 J (``big``) and 1 J
(``small``) per token, so every figure here is a hand computation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gateway.budgets import EmbeddedLedger, Limit
from gateway.carbon import ConstantCarbon, PrometheusCarbon, ScheduleCarbon
from gateway.routing import RouteContext
from gateway.routing.estimators import Difficulty
from gateway.routing.tiers import route
from gateway.sustainability import (
    J_PER_KWH,
    LEDGER_SCALE,
    Factors,
    Site,
    format_amount,
    from_unit,
    to_unit,
)
from gateway.usage_log import read_usage
from policies import PolicyError, RoutingSpec, TierSpec, parse_policy

from .inprocess import InProcessGateway, joules, policy, sse_events, until
from .scripted import Script

pytestmark = pytest.mark.unit

HI = "Say hello in one short sentence."  # estimated at 12 prompt tokens
TWELVE = Script(tokens=["tok"] * 12, prompt_tokens=12)


# -- arithmetic and labels ----------------------------------------------------------------

def test_one_kwh_of_it_energy_by_hand():
    f = Factors("eu", pue=1.5, wue_l_per_kwh=2.0, g_per_kwh=400.0, co2_source="schedule")
    fp = f.footprint(J_PER_KWH)  # 1 kWh at the chips
    assert fp.facility_joules == pytest.approx(1.5 * J_PER_KWH)  # x PUE
    assert fp.water_ml == pytest.approx(2000.0)   # WUE is per kWh of IT energy: 2 L
    assert fp.co2_g == pytest.approx(600.0)       # 1.5 facility kWh x 400 g
    assert fp.usage_fields() == {"facility_joules": 5_400_000.0, "water_ml": 2000.0,
                                 "co2_g": 600.0, "site": "eu", "co2_source": "schedule"}
    assert fp.headers()["x-joulegate-co2-g"] == "600.000000"
    assert fp.headers()["x-joulegate-co2-source"] == "schedule"
    # Per IT joule, in each budget unit's ledger amount (joule-equivalents).
    assert [f.per_joule(u) for u in ("joules", "facility_kwh", "litres", "gco2")] == \
        [1.0, 1.5, 2.0, 600.0]
    assert f.co2_g_per_joule == pytest.approx(600.0 / J_PER_KWH)
    for unit in LEDGER_SCALE:
        assert to_unit(from_unit(3.25, unit), unit) == pytest.approx(3.25)
    assert format_amount(from_unit(0.5, "gco2"), "gco2") == "0.5 gCO2"
    with pytest.raises(ValueError):
        f.per_joule("calories")


def test_sites_label_their_sources():
    at = datetime(2026, 3, 2, 13, tzinfo=UTC)
    assert Site("bare").factors(at) == Factors("bare", 1.0, 0.0, 0.0, "none")
    const = Site("c", 1.2, 0.5, ConstantCarbon(90))
    assert const.fixed is const.factors(at)  # computed once, at policy load
    assert const.factors(at).co2_source == "constant"
    sched = Site("s", 1.1, 0.0, ScheduleCarbon({0: 500.0, 12: 100.0}))
    assert sched.fixed is None
    assert sched.factors(at) == Factors("s", 1.1, 0.0, 100.0, "schedule")
    assert sched.factors(at.replace(hour=3)).g_per_kwh == 500.0
    # "Now" is computed once per quarter hour (schedule) or per new value (Prometheus).
    assert sched.factors() is sched.factors()
    prom = PrometheusCarbon("http://prometheus.invalid:9090", "q")
    site = Site("p", 1.0, 0.0, prom)
    assert site.factors().co2_source == "unavailable"
    prom.value = 180.0
    assert (site.factors().g_per_kwh, site.factors().co2_source) == (180.0, "prometheus")
    prom.value = 90.0
    assert site.factors().g_per_kwh == 90.0


def site_policy(**extra) -> dict:
    """up-big at a coal-heavy site, up-small at a hydro site; acme may add ``extra``."""
    p = policy(extra or None)
    p["sites"] = {
        "coal": {"pue": 1.5, "wue_l_per_kwh": 1.8, "carbon": {"constant": 720.0}},
        "hydro": {"pue": 1.1, "wue_l_per_kwh": 0.2,
                  "carbon": {"schedule": dict.fromkeys(range(24), 24.0)}},
    }
    p["backends"]["up-big"]["site"] = "coal"
    p["backends"]["up-small"]["site"] = "hydro"
    return p


def test_policy_checks_sites_carbon_and_budget_units():
    p = site_policy()
    assert parse_policy(p).sites["coal"].carbon.constant == 720.0
    p["backends"]["up-big"]["site"] = "cole"
    with pytest.raises(PolicyError, match=r"backends.up-big.site: unknown site 'cole'.*'coal'"):
        parse_policy(p)
    p = site_policy()
    p["sites"]["coal"]["carbon"] = {"constant": 1.0, "schedule": {0: 2.0}}
    with pytest.raises(PolicyError, match="exactly one of constant, schedule or prometheus"):
        parse_policy(p)
    p["sites"]["coal"]["carbon"] = {"schedule": {0: 2.0}, "tz": "Mars/Olympus"}
    with pytest.raises(PolicyError, match="unknown time zone"):
        parse_policy(p)
    p["sites"]["coal"]["carbon"] = {"schedule": {0: 2.0}}
    p["sites"]["coal"]["pue"] = 0.9
    with pytest.raises(PolicyError, match="pue"):
        parse_policy(p)
    for budget, ok in (({"window": "1d", "joules": 5}, True),
                       ({"window": "1d", "unit": "gco2", "limit": 5}, True),
                       ({"window": "1d", "unit": "gco2", "joules": 5}, False),
                       ({"window": "1d", "unit": "litres"}, False),
                       ({"window": "1d", "joules": 5, "limit": 5}, False)):
        p = site_policy(budgets=[budget])
        if ok:
            assert parse_policy(p).tenants["acme"].budgets[0].amount == 5
        else:
            with pytest.raises(PolicyError):
                parse_policy(p)


# -- exposed everywhere energy is -----------------------------------------------------------

@pytest.mark.anyio
async def test_usage_headers_stream_metrics_and_usage_log(tmp_path):
    scripts = {"up-big": [TWELVE, TWELVE], "up-small": [Script(tokens=["x"] * 3,
                                                                prompt_tokens=5)]}
    async with InProcessGateway(tmp_path, site_policy(), scripts) as gw:
        whole = await gw.chat(model="big", content=HI, max_tokens=12)
        streamed = await gw.chat(model="big", content=HI, max_tokens=12, stream=True,
                                 stream_options={"include_usage": True})
        small = await gw.chat(model="small", content=HI, max_tokens=3)
        metrics = {name: await gw.metric(name, tenant="acme", tier="big", site="coal")
                   for name in ("joulegate_facility_energy_joules_total",
                                "joulegate_water_litres_total", "joulegate_co2_grams_total")}
        gauge = await gw.metric("joulegate_carbon_intensity_g_per_kwh", site="hydro")
        log_path = gw.runtime.usage_log.path
    it = joules(12, 12, "big")  # 48 J at the chips
    facility = it * 1.5
    expected = {"energy_joules": it, "energy_source": "estimated",  # usage rounds to 1e-6
                "facility_joules": pytest.approx(facility, abs=1e-6),
                "water_ml": pytest.approx(it / J_PER_KWH * 1.8 * 1000, abs=1e-6),
                "co2_g": pytest.approx(facility / J_PER_KWH * 720.0, abs=1e-6),
                "site": "coal", "co2_source": "constant"}
    usage = whole.json()["usage"]
    assert {k: usage[k] for k in expected} == expected
    last = sse_events(streamed.text)[-2]["usage"]
    assert {k: last[k] for k in expected} == expected
    h = whole.headers
    assert float(h["x-joulegate-facility-joules"]) == pytest.approx(facility)
    assert float(h["x-joulegate-water-ml"]) == pytest.approx(it / J_PER_KWH * 1800)
    assert float(h["x-joulegate-co2-g"]) == pytest.approx(facility / J_PER_KWH * 720.0)
    assert h["x-joulegate-site"] == "coal" and h["x-joulegate-co2-source"] == "constant"
    s = small.json()["usage"]
    assert s["site"] == "hydro" and s["co2_source"] == "schedule"
    assert s["co2_g"] == pytest.approx(joules(5, 3, "small") * 1.1 / J_PER_KWH * 24.0, abs=1e-6)
    # Counters per tenant, tier and site: the two big requests.
    assert metrics["joulegate_facility_energy_joules_total"] == pytest.approx(2 * facility)
    assert metrics["joulegate_water_litres_total"] == pytest.approx(2 * it / J_PER_KWH * 1.8)
    assert metrics["joulegate_co2_grams_total"] == pytest.approx(2 * facility / J_PER_KWH * 720)
    assert gauge == 24.0
    records = read_usage(log_path)  # written by the log's thread, flushed at shutdown
    assert [(r["tier"], r["site"], r["j"]) for r in records] == [
        ("big", "coal", it), ("big", "coal", it), ("small", "hydro", joules(5, 3, "small"))]
    assert records[0]["co2"] == pytest.approx(facility / J_PER_KWH * 720.0, abs=1e-6)


# -- budgets in any unit ------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("unit,per_joule", [("joules", 1.0), ("facility_kwh", 1.5 / J_PER_KWH),
                                            ("litres", 1.8 / J_PER_KWH),
                                            ("gco2", 1.5 * 720.0 / J_PER_KWH)])
async def test_a_budget_in_each_unit_reserves_and_settles_exactly(tmp_path, unit, per_joule):
    # Room for exactly two big requests: each reserves (12 + 12) x 2 = 48 J predicted.
    limit = 2 * 48 * per_joule
    budget = {"window": "1d", "joules": limit} if unit == "joules" else \
        {"window": "1d", "unit": unit, "limit": limit}
    slow = Script(tokens=["a", "b", "c"], prompt_tokens=12, token_delay_s=0.05)
    scripts = {"up-big": [slow, Script(tokens=["x"] * 5, prompt_tokens=9), TWELVE]}
    p = site_policy(budgets=[budget], on_exhausted="reject")
    async with InProcessGateway(tmp_path, p, scripts) as gw:
        running = asyncio.ensure_future(gw.chat(model="big", content=HI, max_tokens=12))
        await until(lambda: gw.backends["up-big"].active, "the first request to run")
        window = (await gw.budget())["1d"]
        assert window["unit"] == unit
        assert window["reserved"] == pytest.approx(48 * per_joule)
        first = (await running).json()["usage"]
        second = (await gw.chat(model="big", content=HI, max_tokens=12)).json()["usage"]
        window = (await gw.budget())["1d"]
        spent_j = first["energy_joules"] + second["energy_joules"]  # (12+3 + 9+5) x 2 J
        assert spent_j == joules(12, 3, "big") + joules(9, 5, "big")
        assert window["spent"] == pytest.approx(spent_j * per_joule, rel=1e-9)
        assert window["reserved"] == 0
        if unit == "gco2":  # the window's spend is what usage reported, gram for gram
            assert window["spent"] == pytest.approx(first["co2_g"] + second["co2_g"], abs=1e-5)
        # 58 J spent of 96: a third request's 48 J no longer fits, in any unit.
        refused = await gw.chat(model="big", content=HI, max_tokens=12)
        assert refused.status_code == 429, refused.text
        if unit != "joules":
            assert "facility kWh" in refused.text or "gCO2" in refused.text or " L " in \
                refused.text


def test_ledger_in_a_unit_is_exact_under_concurrency(tmp_path):
    """200 concurrent requests of 7.3 J each against a gCO₂ window that holds 120 and a half
    of them: 120 admitted, each settled with its own joules at the reservation's factor."""
    factor = 1.5 * 431.7  # joule-equivalents of gCO₂ per IT joule (PUE x g/kWh)
    limit = Limit("1d", 120.5 * 7.3 * factor, factor, "gco2")
    now = 1_800_000_030.0

    async def run():
        ledger = EmbeddedLedger(tmp_path / "ledger.sqlite")
        try:
            results = await asyncio.gather(*(
                ledger.reserve("acme", f"r{i}", 7.3, [limit], 60, now=now) for i in range(200)))
            admitted = [r.request_id for r in results if r.ok]
            settled = await asyncio.gather(*(
                ledger.settle("acme", rid, 7.3 - 0.01 * (k % 7)) for k, rid in enumerate(admitted)))
            assert all(settled)
            assert not await ledger.settle("acme", admitted[0], 7.3)  # idempotent
            (state,) = await ledger.status("acme", [limit], now=now)
            return admitted, state
        finally:
            await ledger.close()

    admitted, state = asyncio.run(run())
    assert len(admitted) == 120
    spent_j = sum(7.3 - 0.01 * (k % 7) for k in range(120))
    assert state.reserved == 0
    assert state.spent == pytest.approx(spent_j * factor, abs=1e-6)
    assert to_unit(state.spent, "gco2") == pytest.approx(spent_j * 1.5 * 431.7 / J_PER_KWH)


# -- carbon-aware routing -----------------------------------------------------------------

def _tier(name: str, cost: float = 1.0) -> TierSpec:
    return TierSpec(name=name, backend=f"b-{name}", model=f"{name}-model", cost=cost)


class _Fixed:
    def score(self, generation) -> Difficulty:
        return Difficulty(0.9, {})


def _ctx(weight: float, joules_: dict[str, float], carbon: dict[str, float],
         tiers: tuple[TierSpec, ...], default: TierSpec, **routing) -> RouteContext:
    return RouteContext(tiers, default, RoutingSpec(carbon_weight=weight, **routing), _Fixed(),
                        joules=joules_, carbon=carbon)


def test_routing_prefers_the_cleaner_site_by_its_weight():
    east, west = _tier("east"), _tier("west")
    tiers = (east, west)
    j = {"east": 10.0, "west": 12.0}              # west is a little less efficient...
    g = {"east": 1.5 * 700 / J_PER_KWH, "west": 1.2 * 50 / J_PER_KWH}  # ...but far cleaner
    energy_only = route(_ctx(0.0, j, g, tiers, east), None)
    assert (energy_only.tier.name, energy_only.reason) == ("east", "gate")
    carbon = route(_ctx(1.0, j, g, tiers, east), None)
    assert (carbon.tier.name, carbon.reason) == ("west", "carbon")
    # Half and half: east 0.5*10/12 + 0.5*1 = 0.917; west 0.5*1 + 0.5*(12*60)/(10*1050) = 0.534.
    assert route(_ctx(0.5, j, g, tiers, east), None).tier.name == "west"
    # A tier that is much hungrier loses at a small weight: west at 40 J, weight 0.1.
    j2 = {"east": 10.0, "west": 40.0}
    assert route(_ctx(0.1, j2, g, tiers, east), None).tier.name == "east"


def test_carbon_orders_equal_cost_candidates_and_difficulty_still_gates():
    small, big_dirty, big_clean = _tier("small"), _tier("big-dirty", 4), _tier("big-clean", 4)
    tiers = (small, big_dirty, big_clean)
    j = {"small": 3.0, "big-dirty": 10.0, "big-clean": 11.0}
    g = {"small": 1e-4, "big-dirty": 3e-4, "big-clean": 1e-5}
    thresholds = {"big-dirty": 0.5, "big-clean": 0.5}
    chosen = route(_ctx(0.8, j, g, tiers, small, thresholds=thresholds), None)
    assert (chosen.tier.name, chosen.reason) == ("big-clean", "carbon")
    assert route(_ctx(0.0, j, g, tiers, small, thresholds=thresholds), None).tier.name == \
        "big-dirty"
    # An easy request stays on the default however clean the big tiers are.
    hard_only = {"big-dirty": 0.95, "big-clean": 0.95}
    assert route(_ctx(1.0, j, g, tiers, small, thresholds=hard_only), None).tier.name == "small"
    # A saturated clean tier is skipped for load, as before.
    ctx = RouteContext(tiers, small, RoutingSpec(carbon_weight=1.0, thresholds=thresholds),
                       _Fixed(), saturated=frozenset({"big-clean"}), joules=j, carbon=g)
    assert route(ctx, None).tier.name == "big-dirty"


@pytest.mark.anyio
async def test_the_gateway_sends_auto_requests_to_the_cleaner_site(tmp_path):
    p = site_policy()
    # A second small tier on the coal site, equal in cost and price: only carbon differs.
    p["backends"]["up-small-coal"] = {**p["backends"]["up-small"], "site": "coal"}
    p["tiers"].append({**next(t for t in p["tiers"] if t["name"] == "small"),
                       "name": "small-coal", "backend": "up-small-coal",
                       "model": "small-coal-model"})
    p["tenants"]["acme"]["default_tier"] = "small-coal"
    p["tenants"]["acme"]["routing"] = {"carbon_weight": 1.0}
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.chat(model="auto", content=HI, max_tokens=4)
        decisions = await gw.metric("joulegate_route_decisions_total", tenant="acme",
                                    tier="small", reason="carbon")
    assert r.status_code == 200, r.text
    assert r.headers["x-joulegate-tier"] == "small"
    assert r.json()["usage"]["site"] == "hydro"
    assert decisions == 1
