"""Split a device's measured energy across the requests it served.

A device (a GPU set, the host CPU, an upstream deployment) is read by one meter and
serves many requests at once. Every *tick* reads the meter and shares the energy since
the previous tick among the requests active in that interval, in proportion to the work
each did in it::

    work = prompt_tokens_delta x prompt_weight + output_tokens_delta x output_weight
    (x the tier's work scale, so a token of a bigger model counts for more)

Requests that were active but did no countable work in the interval (waiting on a long
prefill, say) share it equally when nobody else did work. An interval with no active
request is *idle* energy: reported separately, and optionally carried over to the next
interval that has work (``spread_idle``). Ticks run on a timer and at the start and end
of every request, so a request is charged exactly for the intervals it was active in.

A device that also serves other clients (a shared vLLM server) can say which fraction of
its recent token work was the gateway's (``own_fraction``, from the server's own token
counters); only that fraction of each interval's energy goes to the gateway's requests,
the rest is *foreign* and reported apart.

Invariant, at any tick: sum of all requests' joules + idle joules not spread + foreign
joules == the meter's total since the device started (:meth:`EnergyDevice.check_invariant`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from backends import Usage

from .estimated import TokenPriceMeter
from .meter import Meter, Reading

log = logging.getLogger("joulegate.energy")


@dataclass(eq=False, slots=True)
class Share:
    """One request's running account on a device."""

    progress: Usage
    scale: float = 1.0
    seen_prompt: int = 0
    seen_output: int = 0
    joules: float = 0.0
    closed: bool = False


@dataclass(slots=True)
class DeviceTotals:
    meter_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    idle_spread_j: float = 0.0
    foreign_j: float = 0.0


class EnergyDevice:
    """One meter, the requests active on what it measures, and their shares."""

    def __init__(self, name: str, meter: Meter, *, interval_s: float = 0.5,
                 prompt_weight: float = 0.1, output_weight: float = 1.0,
                 spread_idle: bool = False,
                 on_tick: Callable[[EnergyDevice, Reading, float], None] | None = None):
        self.name = name
        self.meter = meter
        self.interval_s = interval_s
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.spread_idle = spread_idle
        self.on_tick = on_tick
        self.totals = DeviceTotals()
        self._active: list[Share] = []
        self._start_j = 0.0
        self._last_j = 0.0
        self._idle_pending = 0.0
        self._task: asyncio.Task | None = None
        self.last_reading = Reading(0.0)
        #: The gateway's fraction of the device's recent work, when others share it.
        self.own_fraction: Callable[[], float] | None = None

    @property
    def source(self) -> str:
        return self.meter.source

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.meter.start()
        self._start_j = self._last_j = self.meter.read().joules
        with contextlib.suppress(RuntimeError):  # no loop: ticks only at request edges
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a meter hiccup must not stop accounting
                log.exception("energy device %s: reading failed", self.name)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.meter.close()

    # -- requests -----------------------------------------------------------------------

    def open(self, progress: Usage, scale: float = 1.0) -> Share:
        """Start charging a request whose backend updates ``progress`` as it works."""
        self.tick()  # energy so far belongs to others (or idle), not to this request
        share = Share(progress, scale, progress.prompt_tokens, progress.completion_tokens)
        self._active.append(share)
        return share

    def close_share(self, share: Share) -> float:
        """Stop charging ``share``; returns its joules. Safe to call twice."""
        if not share.closed:
            self.tick()
            share.closed = True
            self._active.remove(share)
        return share.joules

    # -- the split ------------------------------------------------------------------------

    def _work(self, share: Share) -> float:
        prompt, output = share.progress.prompt_tokens, share.progress.completion_tokens
        work = ((prompt - share.seen_prompt) * self.prompt_weight
                + (output - share.seen_output) * self.output_weight) * share.scale
        if isinstance(self.meter, TokenPriceMeter):
            self.meter.add_tokens(prompt - share.seen_prompt, output - share.seen_output)
        share.seen_prompt, share.seen_output = prompt, output
        return max(work, 0.0)

    def tick(self) -> Reading:
        """Read the meter and share the energy since the last tick."""
        works = [(s, self._work(s)) for s in self._active]
        reading = self.meter.read()
        delta = max(reading.joules - self._last_j, 0.0)
        self._last_j = max(reading.joules, self._last_j)
        self.last_reading = reading
        totals = self.totals
        totals.meter_j += delta
        total_work = sum(w for _, w in works)
        if not works:
            totals.idle_j += delta
            if self.spread_idle:
                self._idle_pending += delta
        else:
            pool = delta
            if self.own_fraction is not None:
                own = min(max(self.own_fraction(), 0.0), 1.0)
                totals.foreign_j += pool * (1.0 - own)
                pool *= own
            if self.spread_idle and total_work > 0:
                pool += self._idle_pending
                totals.idle_spread_j += self._idle_pending
                self._idle_pending = 0.0
            for share, work in works:
                part = pool * (work / total_work if total_work > 0 else 1 / len(works))
                share.joules += part
                totals.attributed_j += part
        if self.on_tick is not None:
            self.on_tick(self, reading, delta if not works else 0.0)
        return reading

    def check_invariant(self) -> float:
        """|requests + unspread idle - meter| (should be ~0, up to float rounding)."""
        t = self.totals
        return abs(t.attributed_j + (t.idle_j - t.idle_spread_j) + t.foreign_j - t.meter_j)


@dataclass(eq=False)
class RequestEnergy:
    """What the pipeline holds for one request: its share on one device."""

    device: EnergyDevice
    share: Share
    joules: float = 0.0
    source: str = field(default="estimated")

    def finish(self) -> float:
        self.joules = self.device.close_share(self.share)
        return self.joules
