"""The meter interface: one abstract reader, one small class per kind of hardware.

A meter reports the *cumulative* energy of what it watches (a GPU, a CPU package, a
process) since it started, and, where it can, the current power. Readings must be cheap
and must not block: meters that need I/O poll in the background and return their latest
value. Cumulative values never go backwards: each meter folds counter resets and
wrap-arounds into its total.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..metrics import Metrics


@dataclass(frozen=True, slots=True)
class Reading:
    #: Joules since the meter started.
    joules: float
    #: Current power per device (``device`` label → watts); empty when unknown.
    watts: dict[str, float] = field(default_factory=dict)


class Meter(abc.ABC):
    """Cumulative energy of one backend's hardware."""

    #: ``measured`` for hardware counters and power sensors, ``estimated`` otherwise.
    source: str = "measured"
    #: Short kind name as written in policies.
    kind: str = ""
    #: Where a meter that polls in the background counts its poller's restarts; set by
    #: the device that owns the meter, before :meth:`start`.
    metrics: Metrics | None = None

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin reading (open handles, start pollers). Raises when the meter cannot work."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` acquired."""

    @abc.abstractmethod
    def read(self) -> Reading:
        """The cumulative reading now (or as of the latest poll)."""

    def weighed(self, work: float) -> None:  # noqa: B027 - optional hook
        """The device weighed ``work`` of a request's tokens (a meter that prices tokens
        counts it as joules; one that reads hardware ignores it)."""

    def describe(self) -> str:
        """One line saying what this meter reads, for logs and ``/readyz``."""
        return self.kind


class MeterUnavailable(Exception):
    """This meter cannot work here (no driver, no counters, no permission)."""
