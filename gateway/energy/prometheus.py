"""Energy of hardware the gateway does not run itself, read from a Prometheus exporter.

Polls an exporter's ``/metrics`` (DCGM exporter, Kepler, a vLLM pod's sidecar) and reads
one series, given as ``NAME{label="value",...}``; several matching series (one per GPU of
a tensor-parallel deployment) are summed. The series is a cumulative energy counter in mJ
(``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION``) or J (Kepler), or power in W
(``DCGM_FI_DEV_POWER_USAGE``), integrated between polls. A counter that goes backwards
(exporter restart) is treated as restarted from zero. :meth:`read` returns the latest
poll, so it never waits on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..supervise import Supervisor
from .meter import Meter, MeterUnavailable, Reading

log = logging.getLogger("joulegate.energy")

_SELECTOR = re.compile(r'^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*$')
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_selector(selector: str) -> tuple[str, dict[str, str]]:
    """``NAME{a="b"}`` → ``("NAME", {"a": "b"})``. Only equality matchers are supported."""
    match = _SELECTOR.match(selector)
    if not match:
        raise ValueError(f"not a series selector: {selector!r}")
    name, body = match.group(1), match.group(2) or ""
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body.strip()):
        m = _MATCHER.match(body, pos)
        if not m:
            raise ValueError(f"unsupported label matcher in {selector!r} (only a=\"b\")")
        labels[m.group(1)] = m.group(2)
        pos = m.end()
    return name, labels


def select(text: str, name: str, labels: dict[str, str]) -> dict[str, float]:
    """Values of the series ``name`` whose labels include ``labels``, keyed by a device id."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                device = sample.labels.get("gpu") or sample.labels.get("device") or \
                    ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) or name
                found[device] = float(sample.value)
    return found


class PrometheusMeter(Meter):
    kind = "prometheus"

    def __init__(self, url: str, series: str, unit: str = "mJ", interval_s: float = 1.0):
        self.url = url
        self.series = series
        self.name, self.labels = parse_selector(series)
        self.unit = unit
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._last_t: float | None = None
        self._total_j = 0.0
        self._watts: dict[str, float] = {}
        #: The supervised poller (:meth:`_run`): restarted if it fails unexpectedly.
        self.poller: Supervisor | None = None
        self._session: aiohttp.ClientSession | None = None
        self.errors = 0

    def start(self) -> None:
        self.poller = Supervisor("prometheus_meter", self._run, self.metrics).start()

    def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()  # its session closes as the task ends

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            while True:
                try:
                    await self.poll()
                except (aiohttp.ClientError, TimeoutError, ValueError, MeterUnavailable) as exc:
                    self.errors += 1
                    if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                        log.warning("prometheus meter %s: %s (%d errors)", self.url, exc, self.errors)
                await asyncio.sleep(self.interval_s)
        finally:
            with contextlib.suppress(Exception):
                await self._session.close()

    async def poll(self) -> None:
        """Scrape once and fold the values into the cumulative total."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        async with self._session.get(self.url) as resp:
            if resp.status != 200:
                raise MeterUnavailable(f"HTTP {resp.status}")
            text = await resp.text()
        values = select(text, self.name, self.labels)
        if not values:
            raise MeterUnavailable(f"no series matches {self.series}")
        self.ingest(values, time.monotonic())

    def ingest(self, values: dict[str, float], t: float) -> None:
        if self.unit == "W":
            if self._last_t is not None:
                for device, watts in values.items():
                    before = self._last.get(device, watts)
                    self._total_j += (watts + before) / 2 * (t - self._last_t)
            self._watts = dict(values)
        else:
            scale = 1e-3 if self.unit == "mJ" else 1.0
            for device, value in values.items():
                previous = self._last.get(device)
                if previous is not None:
                    delta = value - previous if value >= previous else value  # restart: from zero
                    self._total_j += delta * scale
                    if self._last_t is not None and t > self._last_t:
                        self._watts[device] = delta * scale / (t - self._last_t)
        self._last, self._last_t = dict(values), t

    def read(self) -> Reading:
        return Reading(self._total_j, dict(self._watts))

    def describe(self) -> str:
        return f"prometheus ({self.series} [{self.unit}] from {self.url})"
