"""Budget windows in facility kWh, litres and gCO₂ (issue 19), the same for the embedded
SQLite ledger (unit) and a real Redis (e2e): reservations convert the request's IT joules
at the factor of their time, settles spend the measured joules at that same factor, a
window keeps joules and other units side by side, refusals compare in the window's unit,
expiry returns exactly what was held, and spend recorded while the ledger was down uses
the factors it was admitted with."""

from __future__ import annotations

import asyncio

import pytest

from gateway.budgets import Limit
from gateway.sustainability import J_PER_KWH, Factors, from_unit, to_unit

from . import test_ledger
from .test_ledger import Ledgers

redis_url = test_ledger.redis_url  # the session's redis-server (the ``ledgers`` fixture)

NOW = 1_800_000_030.0
COAL = Factors("coal", pue=1.5, wue_l_per_kwh=1.8, g_per_kwh=720.0)
HYDRO = Factors("hydro", pue=1.1, wue_l_per_kwh=0.2, g_per_kwh=24.0)


def limits(f: Factors) -> list[Limit]:
    """A joule day, a gCO₂ hour and a litre minute, converted at ``f``."""
    return [Limit("1d", 1000.0),
            Limit("1h", from_unit(0.2, "gco2"), f.per_joule("gco2"), "gco2"),
            Limit("1m", from_unit(0.001, "litres"), f.per_joule("litres"), "litres")]


@pytest.fixture(params=[pytest.param("embedded", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.e2e)])
def ledgers(request, tmp_path):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    yield Ledgers(request.param, tmp_path, url)
    if url:
        import subprocess

        subprocess.run(["redis-cli", "-p", url.rsplit(":", 1)[1].split("/")[0], "flushall"],
                       capture_output=True, check=False)


def test_reserve_and_settle_in_each_window_s_unit(ledgers):
    async def body():
        ledger = ledgers.new()
        r = await ledger.reserve("acme", "a", 100.0, limits(COAL), 60, now=NOW)
        assert r.ok
        held = [to_unit(w.reserved, w.unit) for w in r.windows]
        assert held == pytest.approx([100.0, 100 * 1.5 * 720 / J_PER_KWH,
                                      100 * 1.8 / J_PER_KWH])
        # Measured 80 J; the site's intensity has changed since: the reservation's factor
        # still settles it (the status call's limits carry other factors).
        assert await ledger.settle("acme", "a", 80.0)
        states = await ledger.status("acme", limits(HYDRO), now=NOW)
        assert [s.reserved for s in states] == [0.0, 0.0, 0.0]
        assert [to_unit(s.spent, s.unit) for s in states] == pytest.approx(
            [80.0, 80 * 1.5 * 720 / J_PER_KWH, 80 * 1.8 / J_PER_KWH], rel=1e-12)

    ledgers.run(body)


def test_refusal_is_decided_in_the_window_s_unit(ledgers):
    async def body():
        ledger = ledgers.new()
        # 0.2 g an hour at coal's 0.0003 g/J holds 666.7 J; 0.001 L a minute at 1.8 L/kWh
        # holds 2000 J: the carbon window refuses 700 J though joules would allow it.
        refused = await ledger.reserve("acme", "big", 700.0, limits(COAL), 60, now=NOW)
        assert not refused.ok and refused.short.window == "1h" and refused.short.unit == "gco2"
        # The same request at the hydro site fits every window.
        ok = await ledger.reserve("acme", "big", 700.0, limits(HYDRO), 60, now=NOW)
        assert ok.ok
        # Expiry returns exactly what the reservation held in each unit.
        states = await ledger.status("acme", limits(HYDRO), now=NOW + 61)
        assert [s.reserved for s in states] == [0.0, 0.0, 0.0]
        assert [s.spent for s in states] == [0.0, 0.0, 0.0]

    ledgers.run(body)


def test_concurrent_reservations_never_overdraw_a_carbon_window(ledgers):
    async def body():
        ledger = ledgers.new()
        window = [Limit("1h", from_unit(0.05, "gco2"), COAL.per_joule("gco2"), "gco2")]
        # 0.05 g at 0.0003 g/J is 166.67 J: 16 requests of 10 J, not 17.
        results = await asyncio.gather(*(ledger.reserve("acme", f"r{i}", 10.0, window, 60,
                                                        now=NOW) for i in range(40)))
        admitted = [r.request_id for r in results if r.ok]
        assert len(admitted) == 16
        await asyncio.gather(*(ledger.settle("acme", rid, 9.5) for rid in admitted))
        (state,) = await ledger.status("acme", window, now=NOW)
        assert state.reserved == 0
        assert to_unit(state.spent, "gco2") == pytest.approx(16 * 9.5 * 1.5 * 720 / J_PER_KWH,
                                                             rel=1e-12)

    ledgers.run(body)


def test_spend_recorded_after_an_outage_uses_its_admission_factors(ledgers):
    async def body():
        ledger = ledgers.new()
        assert await ledger.record("acme", "offline", 50.0, limits(COAL), NOW)
        assert not await ledger.record("acme", "offline", 50.0, limits(COAL), NOW)
        states = await ledger.status("acme", limits(HYDRO), now=NOW)
        assert [to_unit(s.spent, s.unit) for s in states] == pytest.approx(
            [50.0, 50 * 1.5 * 720 / J_PER_KWH, 50 * 1.8 / J_PER_KWH], rel=1e-12)

    ledgers.run(body)
