"""Estimates, for when no energy can be read (no GPU, no RAPL): always ``source=estimated``.

:class:`CpuTimeMeter` estimates an in-process backend's energy from this process's CPU
time: busy core-seconds x ``watts_per_core``, plus ``idle_watts`` x wall time.
:class:`TokenPriceMeter` estimates a remote upstream's energy from the tokens it
processed: prompt tokens x J/prompt token + generated tokens x J/output token; the
attributor feeds it the priced work it sees.
"""

from __future__ import annotations

import time

from .meter import Meter, Reading


class CpuTimeMeter(Meter):
    source = "estimated"
    kind = "estimated"

    def __init__(self, watts_per_core: float, idle_watts: float = 0.0):
        self.watts_per_core = watts_per_core
        self.idle_watts = idle_watts
        self._cpu0 = time.process_time()
        self._wall0 = time.monotonic()
        self._last_cpu = self._cpu0
        self._last_wall = self._wall0

    def read(self) -> Reading:
        cpu, wall = time.process_time(), time.monotonic()
        joules = ((cpu - self._cpu0) * self.watts_per_core
                  + (wall - self._wall0) * self.idle_watts)
        dt = wall - self._last_wall
        watts = {}
        if dt > 0:
            watts["cpu"] = (cpu - self._last_cpu) / dt * self.watts_per_core + self.idle_watts
        self._last_cpu, self._last_wall = cpu, wall
        return Reading(joules, watts)

    def describe(self) -> str:
        return (f"estimated: process CPU-seconds x {self.watts_per_core:g} W/core"
                f" + {self.idle_watts:g} W idle")


class TokenPriceMeter(Meter):
    """The joules of the tokens an upstream processed, priced per token. The prices are the
    backend's (its :class:`~gateway.energy.attribution.Attribution` weights), so a reload
    that changes them does not replace the meter; the device adds each request's priced
    work as it sees it."""

    source = "estimated"
    kind = "estimated"

    def __init__(self) -> None:
        self._joules = 0.0

    def weighed(self, work: float) -> None:
        self._joules += work  # the weights are the backend's prices: work is joules

    def read(self) -> Reading:
        return Reading(self._joules)

    def describe(self) -> str:
        return "estimated: tokens x joules_per_prompt_token / joules_per_output_token"
