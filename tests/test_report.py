"""`joulegate report` (issue 19): energy, water and carbon per tenant and tier from the usage
log, and what routing and deferral saved against sending everything to the full tier at
once; the CSV of a small hand-computed case, the PNG, and the usage log written by a real
(in-process) gateway read back by the report."""

from __future__ import annotations

import asyncio
import csv
from datetime import UTC, datetime

import orjson
import pytest
import yaml

from gateway.cli import main
from gateway.cli.report import parse_since

from .inprocess import InProcessGateway, policy

pytestmark = pytest.mark.unit

KWH = 3.6e6
T13 = datetime(2026, 3, 2, 13, tzinfo=UTC).timestamp()  # hydro's clean hours (20 g)
T05 = datetime(2026, 3, 2, 5, tzinfo=UTC).timestamp()   # hydro's dirty hours (100 g)


def report_policy(state_dir) -> dict:
    """big (2 J/token, the full tier) at a coal site; small (1 J/token) at a hydro site whose
    grid is 100 gCO₂/kWh before noon and 20 after."""
    p = policy()
    p["state_dir"] = str(state_dir)
    p["sites"] = {
        "coal": {"pue": 1.5, "wue_l_per_kwh": 1.8, "carbon": {"constant": 720.0}},
        "hydro": {"pue": 1.1, "wue_l_per_kwh": 0.2, "carbon": {"schedule": {0: 100.0, 12: 20.0}}},
    }
    p["backends"]["up-big"]["site"] = "coal"
    p["backends"]["up-small"]["site"] = "hydro"
    return p


def record(t: float, tier: str, pt: int, ct: int, **extra) -> dict:
    """A usage-log line as the gateway writes it (site factors of report_policy)."""
    price, site, pue, wue = (2.0, "coal", 1.5, 1.8) if tier == "big" else \
        (1.0, "hydro", 1.1, 0.2)
    g = 720.0 if tier == "big" else (100.0 if datetime.fromtimestamp(t, UTC).hour < 12 else 20.0)
    j = (pt + ct) * price
    return {"t": t, "tenant": "acme", "tier": tier, "site": site, "ep": "chat", "status": 200,
            "pt": pt, "ct": ct, "j": j, "es": "estimated", "fj": j * pue,
            "w": j / KWH * wue * 1000, "co2": j * pue / KWH * g, "g": g, "cs": "x", **extra}


def test_report_csv_matches_a_hand_computation(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(report_policy(state)))
    log = state / "usage.jsonl"
    lines = [
        record(T13, "small", 10, 10),                 # routed to small: 20 J
        record(T13, "big", 5, 5),                     # a hard one on big itself: 20 J
        record(T13, "small", 10, 10, sub=T05),        # deferred from 05:00 to 13:00: 20 J
        record(T13 - 30 * 86400, "small", 1, 1),      # before --since: not counted
    ]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines) + b'{"torn')
    out = tmp_path / "reports"
    assert main(["report", "--policy", str(tmp_path / "policy.yaml"), "--since", "2026-03-01",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (csv_path,) = out.glob("report-*.csv")
    (png_path,) = out.glob("report-*.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["tenant"], r["tier"]): r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {("acme", "big"), ("acme", "small"), ("*", "*")}

    def num(row, column):
        return float(rows[row][column])

    # small: 2 requests, 40 J at the chips, 44 J at the facility (PUE 1.1).
    small = ("acme", "small")
    assert rows[small]["requests"] == "2"
    assert num(small, "it_joules") == pytest.approx(40.0)
    assert num(small, "facility_joules") == pytest.approx(44.0)
    assert num(small, "water_l") == pytest.approx(40 / KWH * 0.2, abs=1e-6)
    served = 2 * 22 * 20 / KWH                  # both ran at 13:00, 20 g/kWh
    at_once = 22 * 20 / KWH + 22 * 100 / KWH    # the deferred one could have run at 05:00
    assert num(small, "co2_g") == pytest.approx(served, abs=1e-6)
    # The full tier (big, 2 J/token at coal's 720 g, PUE 1.5) for the same 20 tokens, twice.
    assert num(small, "baseline_joules") == pytest.approx(80.0)
    assert num(small, "baseline_co2_g") == pytest.approx(2 * 40 * 1.5 * 720 / KWH, abs=1e-6)
    assert num(small, "routing_saved_joules") == pytest.approx(40.0)
    assert num(small, "routing_saved_co2_g") == pytest.approx(0.024 - at_once, abs=1e-6)
    assert num(small, "deferral_saved_co2_g") == pytest.approx(at_once - served, abs=1e-6)
    # big is its own baseline: nothing saved.
    big = ("acme", "big")
    assert num(big, "co2_g") == pytest.approx(20 * 1.5 * 720 / KWH, abs=1e-6)
    assert num(big, "routing_saved_co2_g") == pytest.approx(0.0, abs=1e-9)
    assert num(big, "deferral_saved_co2_g") == pytest.approx(0.0, abs=1e-9)
    total = ("*", "*")
    assert rows[total]["requests"] == "3"
    assert num(total, "it_joules") == pytest.approx(60.0)
    assert num(total, "baseline_joules") == pytest.approx(100.0)
    assert "routing saved 40.0 J" in printed and "deferral saved 0.000" in printed


def test_since_accepts_spans_and_iso_times():
    now = 1_800_000_000.0
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("2026-03-01", now) == datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError):
        parse_since("last tuesday", now)


@pytest.mark.anyio
async def test_the_gateways_usage_log_feeds_the_report(tmp_path, capsys):
    state = tmp_path / "state"
    p = report_policy(state)
    async with InProcessGateway(tmp_path, p) as gw:
        for model in ("small", "small", "big"):
            r = await gw.chat(model=model, max_tokens=4)
            assert r.status_code == 200, r.text
    capsys.readouterr()
    assert main(["report", "--policy", str(tmp_path / "policy.yaml"), "--since", "1h",
                 "--out", str(tmp_path / "out")]) == 0
    (csv_path,) = (tmp_path / "out").glob("report-*.csv")
    rows = {(r["tenant"], r["tier"]): r for r in csv.DictReader(csv_path.open())}
    assert rows[("acme", "small")]["requests"] == "2"
    assert rows[("acme", "big")]["requests"] == "1"
    assert float(rows[("acme", "small")]["routing_saved_joules"]) > 0


def test_budget_show_prints_a_carbon_window_in_grams_and_the_tenant_footprint(tmp_path, capsys):
    state = tmp_path / "state"
    p = report_policy(state)
    p["tenants"]["acme"]["budgets"] = [{"window": "1d", "joules": 10_000},
                                       {"window": "7d", "unit": "gco2", "limit": 2.5}]

    async def serve_one():
        async with InProcessGateway(tmp_path, p) as gw:
            return await gw.chat(model="big", max_tokens=4)

    r = asyncio.run(serve_one())  # `budget show` runs its own event loop
    assert r.status_code == 200, r.text
    co2 = r.json()["usage"]["co2_g"]
    capsys.readouterr()
    assert main(["budget", "show", "acme", "--policy", str(tmp_path / "policy.yaml")]) == 0
    out = capsys.readouterr().out
    (day,) = [line for line in out.splitlines() if line.startswith("1d ")]
    (week,) = [line for line in out.splitlines() if line.startswith("7d ")]
    assert "(in" not in day  # a joule window as before
    assert week.endswith("(in gCO2, not J)")
    limit, granted, spent, reserved, remaining = (float(x) for x in week.split()[1:6])
    assert (limit, granted, reserved) == (2.5, 0.0, 0.0)
    assert spent == pytest.approx(co2, abs=1e-5) and remaining == pytest.approx(2.5 - co2, abs=1e-5)
    assert "1 requests" in out and "gCO2 (see `joulegate report`)" in out
