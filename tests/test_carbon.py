"""Carbon-intensity sources (issue 19): constant, a daily schedule, a Prometheus instant
query (against a real Prometheus in the e2e tier, scraping a tiny target that serves a
gauge), and the cleanest start of deferrable work, checked against hand computations."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway.carbon import (
    CarbonSource,
    CarbonUnavailable,
    ConstantCarbon,
    PrometheusCarbon,
    ScheduleCarbon,
    cleanest_start,
    hour_marks,
    mean_intensity,
)
from gateway.sustainability import Site

from .conftest import wait_until
from .inprocess import InProcessGateway, policy

T0 = datetime(2026, 3, 2, 7, 30, tzinfo=UTC)  # a Monday, half past seven UTC
H = timedelta(hours=1)
#: Dirty mornings, a clean midday, a middling evening and night.
DAY = {0: 300.0, 8: 450.0, 12: 120.0, 16: 380.0, 21: 250.0}


@pytest.mark.unit
def test_constant_source_and_its_hourly_forecast():
    c = ConstantCarbon(210)
    assert isinstance(c, CarbonSource) and c.source == "constant"
    assert c.intensity(T0) == 210.0
    points = c.forecast(T0, T0 + 3 * H)
    assert [t for t, _ in points] == [T0, T0 + 0.5 * H, T0 + 1.5 * H, T0 + 2.5 * H]
    assert {v for _, v in points} == {210.0}
    with pytest.raises(ValueError):
        ConstantCarbon(-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        c.intensity(datetime(2026, 1, 1, 12))


@pytest.mark.unit
def test_schedule_steps_without_interpolation_and_fills_unlisted_hours():
    s = ScheduleCarbon(DAY)
    assert s.source == "schedule"
    at = lambda h, m=0: datetime(2026, 3, 2, h, m, tzinfo=UTC)  # noqa: E731
    assert [s.intensity(at(h)) for h in (0, 7, 8, 11, 12, 15, 16, 20, 21, 23)] == \
        [300, 300, 450, 450, 120, 120, 380, 380, 250, 250]
    assert s.intensity(at(11, 59)) == 450  # no interpolation towards 12:00's value
    # Unlisted hours before the first listed one wrap around to the last listed value.
    assert ScheduleCarbon({6: 100.0, 18: 500.0}).intensity(at(3)) == 500.0
    points = s.forecast(T0, T0 + 5 * H)
    assert points == [(T0, 300.0), (at(8), 450.0), (at(9), 450.0), (at(10), 450.0),
                      (at(11), 450.0), (at(12), 120.0)]
    for bad in ({24: 1.0}, {}, {3: -5.0}):
        with pytest.raises(ValueError):
            ScheduleCarbon(bad)


@pytest.mark.unit
def test_schedule_in_a_time_zone_reads_the_local_hour():
    s = ScheduleCarbon({0: 400.0, 12: 100.0}, tz="Asia/Kolkata")  # UTC+5:30
    # 06:30 UTC is 12:00 in Kolkata: the clean half of its day starts then.
    assert s.intensity(datetime(2026, 3, 2, 6, 29, tzinfo=UTC)) == 400.0
    assert s.intensity(datetime(2026, 3, 2, 6, 30, tzinfo=UTC)) == 100.0
    marks = hour_marks(datetime(2026, 3, 2, 6, 0, tzinfo=UTC),
                       datetime(2026, 3, 2, 8, 0, tzinfo=UTC), s.tz)
    assert [m.minute for m in marks] == [0, 30, 30]  # local hours start at half past, UTC


@pytest.mark.unit
def test_mean_intensity_is_time_weighted():
    s = ScheduleCarbon(DAY)
    # 07:30-08:30: half an hour at 300, half at 450.
    assert mean_intensity(s, T0, T0 + H) == pytest.approx(375.0)
    # 11:00-13:00: an hour at 450 and one at 120.
    start = datetime(2026, 3, 2, 11, tzinfo=UTC)
    assert mean_intensity(s, start, start + 2 * H) == pytest.approx(285.0)
    assert mean_intensity(s, T0, T0) == 300.0


@pytest.mark.unit
def test_cleanest_start_finds_the_clean_hours_inside_the_window():
    s = ScheduleCarbon(DAY)
    noon = datetime(2026, 3, 2, 12, tzinfo=UTC)
    # Two hours of work, due within 24 h: midday (120 g) from 12:00 to 14:00.
    assert cleanest_start(s, T0, T0 + 24 * H, 2 * H) == noon
    # Five hours does not fit in 12:00-16:00: the start that makes the least of the dirty
    # edges. Candidates by hand: 11:00-16:00 = (450 + 4*120)/5 = 186; 12:00-17:00 =
    # (4*120 + 380)/5 = 172 -> 12:00.
    assert cleanest_start(s, T0, T0 + 24 * H, 5 * H) == noon
    # Due by 10:00: nothing clean before then; 07:30 (300 until 08:00) beats later starts.
    assert cleanest_start(s, T0, datetime(2026, 3, 2, 10, tzinfo=UTC), H) == T0
    # Work that cannot fit its window starts at once.
    assert cleanest_start(s, T0, T0 + H, 2 * H) == T0
    # A constant grid: no reason to wait.
    assert cleanest_start(ConstantCarbon(200), T0, T0 + 24 * H, H) == T0
    # Zero-length work: the first instant of the cleanest hour.
    assert cleanest_start(s, T0, T0 + 24 * H, timedelta(0)) == noon


@pytest.mark.unit
def test_cleanest_start_is_exact_against_a_brute_force_search():
    s = ScheduleCarbon(DAY)
    latest = T0 + 20 * H
    for duration in (timedelta(minutes=30), 90 * timedelta(minutes=1), 3 * H, 7 * H):
        best = cleanest_start(s, T0, latest, duration)
        brute = min(mean_intensity(s, T0 + k * timedelta(minutes=5),
                                   T0 + k * timedelta(minutes=5) + duration)
                    for k in range(int((latest - duration - T0) / timedelta(minutes=5)) + 1))
        assert mean_intensity(s, best, best + duration) <= brute + 1e-9
        assert T0 <= best <= latest - duration


@pytest.mark.unit
def test_prometheus_answers_are_parsed_and_cached_values_only():
    parse = PrometheusCarbon.parse
    vector = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"zone": "a"}, "value": [1, "100"]},
        {"metric": {"zone": "b"}, "value": [1, "300"]}]}}
    assert parse(vector) == 200.0  # several series: their mean
    assert parse({"status": "success", "data": {"resultType": "scalar",
                                                "result": [1, "42.5"]}}) == 42.5
    for bad in ({"status": "error", "error": "bad query"},
                {"status": "success", "data": {"resultType": "vector", "result": []}},
                {"status": "success", "data": {"resultType": "matrix", "result": []}},
                {"status": "success", "data": {"resultType": "scalar", "result": [1, "-3"]}}):
        with pytest.raises(ValueError):
            parse(bad)
    source = PrometheusCarbon("http://prometheus.invalid:9090", "grid_intensity")
    with pytest.raises(CarbonUnavailable):
        source.intensity(T0)
    # A site reads an unanswered source as 0 g labelled "unavailable", never an error.
    assert Site("eu", 1.2, 0.0, source).factors(T0).co2_source == "unavailable"
    source.value = 180.0
    assert source.intensity(T0) == 180.0
    assert {v for _, v in source.forecast(T0, T0 + 3 * H)} == {180.0}  # held flat
    assert Site("eu", 1.2, 0.0, source).factors(T0).g_per_kwh == 180.0
    with_fallback = PrometheusCarbon("http://prometheus.invalid:9090", "q", fallback=333.0)
    assert with_fallback.intensity(T0) == 333.0


@pytest.mark.unit
def test_a_prometheus_forecast_by_hours_ahead_steers_the_cleanest_start():
    answered = datetime(2026, 3, 2, 7, 40, tzinfo=UTC)
    body = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"hours_ahead": "0"}, "value": [1, "400"]},
        {"metric": {"hours_ahead": "2"}, "value": [1, "90"]},
        {"metric": {"hours_ahead": "2", "model": "b"}, "value": [1, "110"]},
        {"metric": {"hours_ahead": "3"}, "value": [1, "380"]},
        {"metric": {"zone": "DE"}, "value": [1, "1"]}]}}  # no hours_ahead: not a forecast
    hourly = PrometheusCarbon.parse_forecast(body, answered)
    at = lambda h: datetime(2026, 3, 2, h, tzinfo=UTC)  # noqa: E731
    assert hourly == {at(7): 400.0, at(9): 100.0, at(10): 380.0}
    source = PrometheusCarbon("http://prometheus.invalid:9090", "now", forecast_query="ahead")
    source.value, source.hourly = 350.0, hourly
    points = source.forecast(answered, at(12))
    # Hours the forecast does not cover hold the latest value (350).
    assert points == [(answered, 400.0), (at(8), 350.0), (at(9), 100.0), (at(10), 380.0),
                      (at(11), 350.0)]
    assert cleanest_start(source, answered, at(12), H) == at(9)


# -- a real Prometheus --------------------------------------------------------------------

class GaugeTarget:
    """A tiny scrape target: ``grid_carbon_intensity_g_per_kwh{zone="DE"} <value>``."""

    def __init__(self, value: float):
        self.value = value
        #: hours ahead → forecast value (``grid_carbon_forecast_g_per_kwh``).
        self.forecast = {0: value, 1: 300.0, 2: 60.0, 3: 280.0}
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = ("# TYPE grid_carbon_intensity_g_per_kwh gauge\n"
                        f'grid_carbon_intensity_g_per_kwh{{zone="DE"}} {target.value}\n'
                        "# TYPE grid_carbon_forecast_g_per_kwh gauge\n" + "".join(
                            f'grid_carbon_forecast_g_per_kwh{{zone="DE",hours_ahead="{h}"}} '
                            f"{v}\n" for h, v in target.forecast.items())).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grid_target():
    target = GaugeTarget(412.0)
    yield target
    target.close()


@pytest.mark.e2e
def test_prometheus_source_reads_a_real_prometheus_and_follows_changes(grid_target,
                                                                       prometheus_for):
    prom = prometheus_for(grid_target.address)
    query = 'grid_carbon_intensity_g_per_kwh{zone="DE"}'
    wait_until(lambda: prom.query(query), 30, 0.2, "the first scrape of the grid target")

    async def run() -> list[float]:
        source = PrometheusCarbon(prom.url, query, refresh_s=0.2,
                                  forecast_query='grid_carbon_forecast_g_per_kwh{zone="DE"}')
        seen = [await source.refresh()]
        # The forecast's clean hour (two hours ahead) is where an hour of work should start.
        now = source.updated_at
        assert now is not None
        hour = now.replace(minute=0, second=0, microsecond=0)
        assert cleanest_start(source, now, now + 4 * H, H) == hour + 2 * H
        assert dict(source.forecast(now, now + 4 * H))[hour + 2 * H] == 60.0
        source.start()
        try:
            grid_target.value = 97.5  # the grid got cleaner; Prometheus scrapes each second
            for _ in range(300):
                if source.value == 97.5:
                    break
                await asyncio.sleep(0.1)
            seen.append(source.intensity(datetime.now(UTC)))
            assert source.errors == 0
        finally:
            await source.close()
        return seen

    assert asyncio.run(run()) == [412.0, 97.5]


@pytest.mark.e2e
def test_a_gateway_labels_co2_from_a_real_prometheus(grid_target, prometheus_for, tmp_path):
    prom = prometheus_for(grid_target.address)
    query = 'grid_carbon_intensity_g_per_kwh{zone="DE"}'
    wait_until(lambda: prom.query(query), 30, 0.2, "the first scrape of the grid target")
    p = policy()
    p["sites"] = {"de": {"pue": 1.25, "carbon": {"prometheus": {
        "url": prom.url, "query": query, "refresh_s": 0.2}}}}
    p["backends"]["up-big"]["site"] = "de"

    async def run():
        async with InProcessGateway(tmp_path, p) as gw:
            source = gw.runtime.current.site_by_name["de"].carbon
            for _ in range(300):
                if source.value is not None:
                    break
                await asyncio.sleep(0.1)
            r = await gw.chat(model="big", max_tokens=4)
            gauge = await gw.metric("joulegate_carbon_intensity_g_per_kwh", site="de")
            return r, gauge

    r, gauge = asyncio.run(run())
    usage = r.json()["usage"]
    assert usage["co2_source"] == "prometheus" and usage["site"] == "de"
    expected = usage["energy_joules"] * 1.25 / 3.6e6 * 412.0
    assert usage["co2_g"] == pytest.approx(expected, abs=1e-6)  # usage rounds to 1e-6 g
    assert r.headers["x-joulegate-co2-source"] == "prometheus"
    assert gauge in (0.0, 412.0)  # set at start (before the first answer) or since
