"""Meters against their hardware boundary: a fake pynvml, a temporary sysfs tree, and a
real Prometheus exposition endpoint."""

from __future__ import annotations

import asyncio
import sys
import time
import types

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gateway.energy import MeterUnavailable
from gateway.energy.estimated import CpuTimeMeter
from gateway.energy.nvml import NvmlMeter
from gateway.energy.prometheus import PrometheusMeter, parse_selector
from gateway.energy.rapl import RaplMeter

from .conftest import free_port

# Marked test by test: the unit ones start no process and open no socket.


class _NVMLError(Exception):
    pass


def fake_pynvml(energy_mj: dict[int, list[int]] | None, power_mw: dict[int, float]):
    """A pynvml module: per GPU a scripted energy counter (None: not supported) and power."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda i: i

    def energy(handle):
        if energy_mj is None or handle not in energy_mj:
            raise _NVMLError("Not Supported")
        values = energy_mj[handle]
        return values.pop(0) if len(values) > 1 else values[0]

    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    mod.nvmlDeviceGetPowerUsage = lambda handle: power_mw[handle]
    return mod


@pytest.mark.unit
def test_nvml_counter_path_sums_gpus_and_survives_a_reset(monkeypatch):
    counters = {0: [1_000_000, 1_005_000, 1_012_000, 3_000], 1: [50_000, 52_000, 54_000, 56_000]}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counters, {0: 250_000, 1: 200_000}))
    meter = NvmlMeter([0, 1])
    meter.start()  # first counter values are the baseline
    r1 = meter.read()
    assert r1.joules == pytest.approx(5.0 + 2.0)
    assert r1.watts == {"gpu0": 250.0, "gpu1": 200.0}
    assert meter.read().joules == pytest.approx(7.0 + 7.0 + 2.0)
    # gpu0 counter went back to 3000 mJ (driver reload): counted as 3 J since the reset
    assert meter.read().joules == pytest.approx(16.0 + 3.0 + 2.0)
    assert "energy counter" in meter.describe()
    meter.close()


@pytest.mark.unit
def test_nvml_power_sampling_path_integrates(monkeypatch):
    power = {0: 300_000.0}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None, power))
    meter = NvmlMeter([0], sample_period_s=0.01)
    meter.start()
    t0 = time.monotonic()
    time.sleep(0.3)
    elapsed = time.monotonic() - t0
    joules = meter.read().joules
    meter.close()
    assert "power sampling" in meter.describe()
    # 300 W over the sampled time (which ends at the last sample, so slightly under elapsed)
    assert 300 * (elapsed - 0.05) <= joules <= 300 * (elapsed + 0.02)


@pytest.mark.unit
def test_nvml_unavailable_without_the_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterUnavailable, match="pynvml is not installed"):
        NvmlMeter([0]).start()


def _zone(path, name, energy_uj, max_uj):
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")


@pytest.mark.unit
def test_rapl_sums_packages_and_dram_and_wraps(tmp_path):
    _zone(tmp_path / "intel-rapl:0", "package-0", 1_000_000, 10_000_000)
    _zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:0", "core", 5, 10_000_000)
    _zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:1", "dram", 100, 10_000_000)
    _zone(tmp_path / "intel-rapl:1", "package-1", 9_500_000, 10_000_000)
    meter = RaplMeter(str(tmp_path))
    meter.start()
    assert "dram" in meter.describe() and "core" not in meter.describe()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # +2 J
    (tmp_path / "intel-rapl:0" / "intel-rapl:0:1" / "energy_uj").write_text("500100\n")  # +0.5 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("499999\n")  # wrapped: +1 J
    assert meter.read().joules == pytest.approx(2.0 + 0.5 + 1.0)


@pytest.mark.unit
def test_rapl_missing_is_unavailable(tmp_path):
    with pytest.raises(MeterUnavailable, match="no RAPL zones"):
        RaplMeter(str(tmp_path)).start()


@pytest.mark.e2e
def test_prometheus_meter_reads_a_real_exporter():
    registry = CollectorRegistry()
    energy = Counter("dcgm_energy_mj", "test counter", ["gpu", "Hostname"], registry=registry)
    power = Gauge("dcgm_power_w", "test gauge", ["gpu"], registry=registry)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{port}/metrics"

    async def scenario():
        meter = PrometheusMeter(url, 'dcgm_energy_mj_total{Hostname="n1"}', unit="mJ")
        energy.labels("0", "n1").inc(1000)
        energy.labels("1", "n1").inc(500)
        energy.labels("0", "other-node").inc(10_000)  # not selected
        await meter.poll()
        assert meter.read().joules == 0  # the first poll is the baseline
        energy.labels("0", "n1").inc(4000)
        energy.labels("1", "n1").inc(1000)
        await meter.poll()
        assert meter.read().joules == pytest.approx(5.0)
        watts = PrometheusMeter(url, 'dcgm_power_w{gpu="0"}', unit="W")
        power.labels("0").set(200)
        await watts.poll()
        await asyncio.sleep(0.2)
        await watts.poll()
        assert watts.read().joules == pytest.approx(200 * 0.2, rel=0.25)
        assert watts.read().watts == {"0": 200.0}
        missing = PrometheusMeter(url, "nothing_here", unit="J")
        with pytest.raises(MeterUnavailable, match="no series matches"):
            await missing.poll()
        for m in (meter, watts, missing):
            await m._session.close()

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()


@pytest.mark.unit
def test_selector_parsing():
    assert parse_selector('a_b{x="1",y="two"}') == ("a_b", {"x": "1", "y": "two"})
    with pytest.raises(ValueError):
        parse_selector('a{x=~"1"}')


@pytest.mark.unit
def test_cpu_time_meter_counts_this_process():
    meter = CpuTimeMeter(watts_per_core=10.0)
    before = meter.read().joules
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    gained = meter.read().joules - before
    assert gained == pytest.approx(10.0 * (time.process_time() - t0), rel=0.2)
    assert meter.source == "estimated"
