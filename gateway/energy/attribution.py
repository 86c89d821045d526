"""Split a device's measured energy across the requests it served.

A device (a GPU set, the host CPU, an upstream deployment) is read by one meter and
serves many requests at once. Every *tick* reads the meter and shares the energy since
the previous tick among the requests active in that interval, in proportion to the work
each did in it::

    work = prompt_tokens_delta x prompt_weight + output_tokens_delta x output_weight
    (x the tier's work scale, so a token of a bigger model counts for more)

The weights are the request's backend's (:class:`Attribution`), so backends with different
weights can share one device. Requests that were active but did no countable work in the
interval (waiting on a long prefill, say) share it equally when nobody else did work; only
requests that have started (done some work) take part in that split, so a request still
queued for a slot behind another (no tokens processed yet) is charged nothing while it
waits: queueing is not work. (When none has started, all share it, as with an upstream
that reports tokens only at the end.) An
interval with no active request is *idle* energy: reported separately, and carried over
to the next interval that has work for those of its requests whose backend asks for it
(``spread_idle``). Ticks run on a timer and at the start and end
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
from typing import TYPE_CHECKING

from backends import Usage

from ..supervise import Supervisor
from .meter import Meter, Reading

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("joulegate.energy")


def split(pool: float, works: list[float], started: list[bool]) -> list[float]:
    """``pool`` joules shared over the requests of one interval: by their ``works`` when any
    did work; otherwise equally among those that have ``started`` (a request waiting for a
    slot has not, so queueing is billed nothing), or among all when none has. The parts
    always sum to ``pool``."""
    total = sum(works)
    if total > 0:
        return [pool * w / total for w in works]
    if not any(started):
        return [pool / len(works)] * len(works)
    takers = sum(started)
    return [pool / takers if ok else 0.0 for ok in started]


@dataclass(frozen=True, slots=True)
class Attribution:
    """How one backend's requests are weighed on a device: the backend's settings, not the
    device's, so backends with different weights can share one piece of hardware.

    On a token-priced device the weights are the prices (J per prompt / output token)."""

    prompt_weight: float = 0.1
    output_weight: float = 1.0
    #: Take a share of the idle energy before an interval with work, as overhead.
    spread_idle: bool = False


@dataclass(eq=False, slots=True)
class Share:
    """One request's running account on a device."""

    progress: Usage
    scale: float = 1.0
    weights: Attribution = Attribution()
    seen_prompt: int = 0
    seen_output: int = 0
    joules: float = 0.0
    closed: bool = False
    #: The device charging this share now (a device replaced on reload hands it on).
    device: EnergyDevice | None = None


def _started(share: Share) -> bool:
    """Whether the request has done any work yet (one queued for a slot has not)."""
    return share.seen_prompt > 0 or share.seen_output > 0


@dataclass(slots=True)
class DeviceTotals:
    meter_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    idle_spread_j: float = 0.0
    foreign_j: float = 0.0


class EnergyDevice:
    """One meter, the requests active on what it measures, and their shares.

    The device owns only what reading the hardware needs (the meter and how often to tick);
    how a request's work is weighed comes with the request (:class:`Attribution`)."""

    def __init__(self, name: str, meter: Meter, *, interval_s: float = 0.5,
                 on_tick: Callable[[EnergyDevice, Reading, float], None] | None = None,
                 metrics: Metrics | None = None):
        self.name = name
        self.meter = meter
        self.metrics = meter.metrics = metrics
        self.interval_s = interval_s
        self.on_tick = on_tick
        self.totals = DeviceTotals()
        self._active: list[Share] = []
        self._last_j = 0.0
        self._idle_pending = 0.0
        #: The supervised timer (:meth:`_run`): restarted if it ever fails.
        self.timer: Supervisor | None = None
        self.closed = False
        self.last_reading = Reading(0.0)
        #: The gateway's fraction of the device's recent work, when others share it.
        self.own_fraction: Callable[[], float] | None = None

    @property
    def source(self) -> str:
        return self.meter.source

    @property
    def active(self) -> int:
        """Requests being charged on this device now."""
        return len(self._active)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the meter and begin charging."""
        self.meter.start()
        self.activate()

    def activate(self) -> None:
        """Begin charging (the meter is started): energy read before now is nobody's, and
        ticks run every ``interval_s`` when there is an event loop. A device prepared beside
        the one it replaces starts its meter early and is activated when it takes over."""
        self._last_j = self.meter.read().joules
        if self.timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: ticks only at request edges
                asyncio.get_running_loop()
                self.timer = Supervisor("energy_timer", self._run,
                                        self.metrics).start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # a meter hiccup must not stop accounting (logged with its trace)
                log.exception("energy device %s: reading failed", self.name)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()  # ends at the loop's next turn, whatever it was doing
            self.timer = None
        if not self.closed:
            self.closed = True
            self.meter.close()

    def hand_over(self, successor: EnergyDevice) -> None:
        """Replace this device by ``successor`` (same hardware, new meter settings): charge
        the energy so far here, move the requests in flight to the successor, which charges
        them from now on, and close. No request is left on a closed device and no interval
        is read by both."""
        self.tick()
        successor.activate()
        for share in self._active:
            share.device = successor
        successor._active.extend(self._active)
        self._active.clear()
        self.close()

    # -- requests -----------------------------------------------------------------------

    def open(self, progress: Usage, scale: float = 1.0,
             weights: Attribution = Attribution()) -> Share:
        """Start charging a request whose backend updates ``progress`` as it works,
        weighed by its backend's ``weights`` and its tier's ``scale``."""
        if self.closed:
            raise RuntimeError(f"energy device {self.name} is closed")
        self.tick()  # energy so far belongs to others (or idle), not to this request
        share = Share(progress, scale, weights, progress.prompt_tokens,
                      progress.completion_tokens, device=self)
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
        weights = share.weights
        work = ((prompt - share.seen_prompt) * weights.prompt_weight
                + (output - share.seen_output) * weights.output_weight)
        self.meter.weighed(max(work, 0.0))
        share.seen_prompt, share.seen_output = prompt, output
        return max(work * share.scale, 0.0)

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
            self._idle_pending += delta
        else:
            pool = delta
            if self.own_fraction is not None:
                own = min(max(self.own_fraction(), 0.0), 1.0)
                totals.foreign_j += pool * (1.0 - own)
                pool *= own
            parts = split(pool, [w for _, w in works], [_started(s) for s, _ in works])
            for (share, _), part in zip(works, parts, strict=True):
                share.joules += part
                totals.attributed_j += part
            if total_work > 0:
                self._spread_idle(works)
        if self.on_tick is not None:
            self.on_tick(self, reading, delta if not works else 0.0)
        return reading

    def _spread_idle(self, works: list[tuple[Share, float]]) -> None:
        """The idle energy since the last interval with work goes, as overhead, to those of
        this interval's requests whose backend spreads idle, by their work; with none, it
        stays idle."""
        pending, self._idle_pending = self._idle_pending, 0.0
        takers = [(s, w) for s, w in works if s.weights.spread_idle and w > 0]
        taken = sum(w for _, w in takers)
        if pending <= 0 or taken <= 0:
            return
        for share, work in takers:
            part = pending * work / taken
            share.joules += part
            self.totals.attributed_j += part
        self.totals.idle_spread_j += pending

    def check_invariant(self) -> float:
        """|requests + unspread idle + foreign - meter| (should be ~0, up to float rounding)."""
        t = self.totals
        return abs(t.attributed_j + (t.idle_j - t.idle_spread_j) + t.foreign_j - t.meter_j)


@dataclass(eq=False)
class RequestEnergy:
    """What the pipeline holds for one request: its share, on whichever device charges it."""

    share: Share
    source: str = field(default="estimated")

    @property
    def device(self) -> EnergyDevice:
        assert self.share.device is not None
        return self.share.device

    def finish(self) -> float:
        return self.device.close_share(self.share)
