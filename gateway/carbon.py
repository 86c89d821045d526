"""Grid carbon intensity (gCO₂ per kWh) of the electricity a site draws, now and ahead.

A :class:`CarbonSource` answers two questions: the intensity at an instant
(:meth:`~CarbonSource.intensity`) and a forecast over a window
(:meth:`~CarbonSource.forecast`: hourly points, each value holding until the next point).
Three sources, named by their ``source`` label:

``constant``
    :class:`ConstantCarbon`: one figure, always (a yearly grid average).
``schedule``
    :class:`ScheduleCarbon`: a daily schedule, hour of day (0-23, in ``tz``) → gCO₂/kWh.
    No interpolation: an instant takes the value of its hour. Hours left out take the value
    of the nearest listed hour before them (wrapping past midnight), so ``{0: 300, 8: 450,
    18: 350}`` is a three-step day.
``prometheus``
    :class:`PrometheusCarbon`: an instant query against a Prometheus server's HTTP API (the
    way operators already import grid data, e.g. an exporter of a grid-data API), refreshed
    every ``refresh_s`` by a supervised background task and cached, so :meth:`intensity` never
    waits on the network. Its forecast is the latest value held flat, unless a
    ``forecast_query`` gives one: an instant query whose samples carry a label
    ``hours_ahead`` (0, 1, 2, ...: the value for the hour starting that many whole hours
    after the query was answered, as exporters of grid forecasts can publish it); hours it
    does not cover hold the latest value. Until the first successful query it answers
    ``fallback`` or, without one, raises :class:`CarbonUnavailable`.

:func:`cleanest_start` picks when deferrable work of a given duration should start inside a
window so that its mean intensity is lowest; :func:`mean_intensity` is that mean. Everything
here is pure except :class:`PrometheusCarbon`'s HTTP fetch. All instants are timezone-aware;
they are compared and returned in UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    import aiohttp

    from .metrics import Metrics
    from .supervise import Supervisor

log = logging.getLogger("joulegate.carbon")

HOUR = timedelta(hours=1)


class CarbonUnavailable(RuntimeError):
    """The source has no value yet (a Prometheus source before its first answer)."""


@runtime_checkable
class CarbonSource(Protocol):
    """Where a site's grid carbon intensity comes from (see the module docstring)."""

    #: ``constant``, ``schedule`` or ``prometheus``: the label a figure derived from it carries.
    source: str

    def intensity(self, at: datetime) -> float:
        """gCO₂ per kWh at ``at`` (timezone-aware)."""
        ...

    def forecast(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        """``(instant, gCO₂/kWh)`` points in UTC covering ``[start, end)``: the first at
        ``start``, then one at each hour boundary before ``end``; each value holds until
        the next point."""
        ...


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"carbon intensity needs a timezone-aware instant, got {at!r}")
    return at.astimezone(UTC)


def hour_marks(start: datetime, end: datetime, tz: ZoneInfo | None = None) -> list[datetime]:
    """``start`` and every hour boundary (of ``tz``'s clock; UTC by default) in ``(start, end)``,
    in UTC. An empty window (``end <= start``) gives just ``start``."""
    start, end = _utc(start), _utc(end)
    local = start.astimezone(tz) if tz is not None else start
    floor = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    marks = [start]
    t = floor + HOUR
    while t < end:
        marks.append(t)
        t += HOUR
    return marks


class ConstantCarbon:
    """One intensity at every instant."""

    source = "constant"

    def __init__(self, g_per_kwh: float):
        if not math.isfinite(g_per_kwh) or g_per_kwh < 0:
            raise ValueError(f"carbon intensity must be a finite number >= 0, got {g_per_kwh}")
        self.g_per_kwh = float(g_per_kwh)

    def intensity(self, at: datetime) -> float:
        _utc(at)
        return self.g_per_kwh

    def forecast(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        return [(t, self.g_per_kwh) for t in hour_marks(start, end)]

    def __repr__(self) -> str:
        return f"ConstantCarbon({self.g_per_kwh:g})"


class ScheduleCarbon:
    """A daily schedule: hour of day in ``tz`` → gCO₂/kWh (step function, no interpolation)."""

    source = "schedule"

    def __init__(self, hours: Mapping[int, float], tz: str = "UTC"):
        if not hours:
            raise ValueError("a carbon schedule needs at least one hour")
        for hour, value in hours.items():
            if not isinstance(hour, int) or not 0 <= hour <= 23:
                raise ValueError(f"schedule hours are 0..23, got {hour!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"carbon intensity must be a finite number >= 0, got {value}")
        self.tz_name = tz
        self.tz = ZoneInfo(tz)
        self.hours = {int(h): float(v) for h, v in hours.items()}
        # Every hour of the day, each unlisted hour taking the last listed one before it.
        listed = sorted(self.hours)
        table: list[float] = []
        for h in range(24):
            before = [x for x in listed if x <= h]
            table.append(self.hours[before[-1] if before else listed[-1]])
        self.table = tuple(table)

    def intensity(self, at: datetime) -> float:
        return self.table[_utc(at).astimezone(self.tz).hour]

    def forecast(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        return [(t, self.intensity(t)) for t in hour_marks(start, end, self.tz)]

    def __repr__(self) -> str:
        return f"ScheduleCarbon({self.hours}, tz={self.tz_name!r})"


class PrometheusCarbon:
    """The value of a Prometheus instant query, refreshed in the background and cached.

    ``url`` is the server's base URL (``http://prometheus:9090``); the query is sent to
    ``{url}/api/v1/query``. A vector of several series gives their mean; a scalar is used
    as is. A failed refresh keeps the last value (``errors`` counts failures, and
    ``updated_at`` says when the value was last read)."""

    source = "prometheus"

    def __init__(self, url: str, query: str, refresh_s: float = 60.0,
                 fallback: float | None = None, timeout_s: float = 5.0,
                 forecast_query: str | None = None):
        if refresh_s <= 0:
            raise ValueError("refresh_s must be > 0")
        self.url = url.rstrip("/")
        self.query = query
        self.refresh_s = float(refresh_s)
        self.fallback = fallback
        self.timeout_s = timeout_s
        self.value: float | None = None
        self.updated_at: datetime | None = None
        self.forecast_query = forecast_query
        #: Start of an hour (UTC) → its forecast value, from ``forecast_query``.
        self.hourly: dict[datetime, float] = {}
        self.errors = 0
        self._session: aiohttp.ClientSession | None = None
        self._poller: Supervisor | None = None

    # -- reading -------------------------------------------------------------------------
    def _current(self) -> float:
        if self.value is not None:
            return self.value
        if self.fallback is not None:
            return self.fallback
        raise CarbonUnavailable(f"no answer yet from {self.url} for {self.query!r}")

    def intensity(self, at: datetime) -> float:
        _utc(at)
        return self._current()

    def forecast(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        value = self._current()
        hourly = self.hourly
        return [(t, hourly.get(t.replace(minute=0, second=0, microsecond=0), value))
                for t in hour_marks(start, end)]

    @staticmethod
    def parse_forecast(body: object, answered_at: datetime) -> dict[datetime, float]:
        """Hour start → value from a ``forecast_query`` answer (samples labelled
        ``hours_ahead``; several for one hour: their mean)."""
        data = PrometheusCarbon._data(body, "forecast query failed")
        if data.get("resultType") != "vector":
            raise ValueError("a forecast query must return a vector")
        base = _utc(answered_at).replace(minute=0, second=0, microsecond=0)
        seen: dict[datetime, list[float]] = {}
        for sample in data.get("result") or []:
            ahead = sample.get("metric", {}).get("hours_ahead")
            value = float(sample["value"][1])
            if ahead is None or not ahead.isdigit() or not math.isfinite(value) or value < 0:
                continue
            seen.setdefault(base + int(ahead) * HOUR, []).append(value)
        return {t: sum(v) / len(v) for t, v in seen.items()}

    # -- fetching ------------------------------------------------------------------------
    @staticmethod
    def parse(body: object) -> float:
        """The intensity in a ``/api/v1/query`` answer (mean of a vector's samples)."""
        data = PrometheusCarbon._data(body, "query failed")
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar" and isinstance(result, list) and len(result) == 2:
            values = [float(result[1])]
        elif kind == "vector" and isinstance(result, list):
            values = [float(s["value"][1]) for s in result]
        else:
            raise ValueError(f"unsupported result type {kind!r}")
        values = [v for v in values if math.isfinite(v)]
        if not values:
            raise ValueError("the query returned no finite sample")
        mean = sum(values) / len(values)
        if mean < 0:
            raise ValueError(f"negative carbon intensity {mean}")
        return mean

    async def refresh(self) -> float:
        """Query once and cache the answer (raises on failure, keeping the last value)."""
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        value = self.parse(await self._get(self._session, self.query, ""))
        now = datetime.now(UTC)
        if self.forecast_query is not None:
            self.hourly = self.parse_forecast(
                await self._get(self._session, self.forecast_query, "forecast query: "), now)
        self.value, self.updated_at = value, now
        return value

    async def _get(self, session: Any, query: str, what: str) -> object:
        """The JSON answer of an instant query (``what`` prefixes an HTTP failure)."""
        async with session.get(f"{self.url}/api/v1/query", params={"query": query}) as resp:
            if resp.status != 200:
                raise ValueError(f"{what}HTTP {resp.status}")
            return await resp.json(content_type=None)

    @staticmethod
    def _data(body: object, failed: str) -> dict[str, Any]:
        """The ``data`` of a successful query answer; ``failed`` leads the error otherwise."""
        if not isinstance(body, dict) or body.get("status") != "success":
            raise ValueError(f"{failed}: {str(body)[:200]}")
        data: dict[str, Any] = body.get("data") or {}
        return data

    async def _run(self) -> None:
        import aiohttp

        try:
            while True:
                try:
                    await self.refresh()
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError,
                        TypeError) as exc:
                    self.errors += 1
                    if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                        log.warning("carbon source %s (%s): %s (%d errors)", self.url,
                                    self.query, exc, self.errors)
                await asyncio.sleep(self.refresh_s)
        finally:
            await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()

    def start(self, metrics: Metrics | None = None) -> None:
        """Start the refresh loop on the running event loop (idempotent)."""
        from .supervise import Supervisor

        if self._poller is None:
            self._poller = Supervisor("carbon_source", self._run, metrics).start()

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            await poller.close()
        await self._close_session()

    def __repr__(self) -> str:
        return f"PrometheusCarbon({self.url!r}, {self.query!r})"


def mean_intensity(source: CarbonSource, start: datetime, end: datetime) -> float:
    """Time-weighted mean gCO₂/kWh over ``[start, end)`` from the source's forecast
    (the intensity at ``start`` for an empty window)."""
    start, end = _utc(start), _utc(end)
    if end <= start:
        return source.intensity(start)
    points = source.forecast(start, end)
    total = 0.0
    for i, (t, value) in enumerate(points):
        t_next = points[i + 1][0] if i + 1 < len(points) else end
        total += value * (min(t_next, end) - max(t, start)).total_seconds()
    return total / (end - start).total_seconds()


def cleanest_start(source: CarbonSource, earliest: datetime, latest: datetime,
                   duration: timedelta) -> datetime:
    """When to start work lasting ``duration`` so that it runs in ``[earliest, latest]``
    with the lowest mean intensity. ``latest`` is when the work must be done by, so the
    start is at most ``latest - duration``; if the work does not fit, ``earliest``. Ties go
    to the earliest start.

    The mean over ``[s, s + duration)`` of a step function is piecewise linear in ``s``
    with breakpoints where ``s`` or ``s + duration`` meets a step, so checking those
    candidates finds the exact minimum."""
    earliest, latest = _utc(earliest), _utc(latest)
    last_start = latest - duration
    if last_start <= earliest:
        return earliest
    steps = [t for t, _ in source.forecast(earliest, latest)]
    candidates = {earliest, last_start}
    for t in steps:
        for s in (t, t - duration):
            if earliest <= s <= last_start:
                candidates.add(s)
    best, best_mean = earliest, math.inf
    for s in sorted(candidates):
        if duration > timedelta(0):
            mean = mean_intensity(source, s, s + duration)
        else:
            mean = source.intensity(s)
        if mean < best_mean - 1e-12:
            best, best_mean = s, mean
    return best
