"""The time the batch scheduler lives by: :class:`Clock` (``now()`` and ``sleep_until()``).

Deferring work to a cleaner hour means waiting hours; tests cannot. So the scheduler never
reads the wall clock or sleeps by itself: it asks its clock. Three clocks:

:class:`SystemClock`
    The wall clock (the gateway's default). Waits in slices of at most a minute, so a
    clock that jumps (NTP, a suspended VM) is noticed within a minute.
:class:`ManualClock`
    Stands still until told: :meth:`ManualClock.set` / :meth:`ManualClock.advance` move it
    and wake every waiter whose instant has come. For tests and simulations in-process.
:class:`FileClock`
    *A test aid for real gateway processes*: the time is the ISO-8601 instant written in a
    file (``JOULEGATE_BATCH_CLOCK_FILE``), re-read on every ``now()`` and polled while
    waiting, so an end-to-end test moves a running gateway's batch clock by rewriting the
    file. Never set that variable in production.

Only batch scheduling follows this clock (when a batch starts, expires, and the times on
batch and file objects); budgets, energy and leases between worker processes keep real time.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

#: The environment variable that makes a gateway's batch clock a :class:`FileClock`.
CLOCK_FILE_ENV = "JOULEGATE_BATCH_CLOCK_FILE"


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant (timezone-aware, UTC)."""
        ...

    async def sleep_until(self, at: datetime) -> None:
        """Return once ``now() >= at`` (at once if it already is)."""
        ...


class SystemClock:
    """The wall clock."""

    #: The longest single sleep: a clock that jumps is noticed within this.
    slice_s = 60.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, at: datetime) -> None:
        # Time itself is what is awaited here: there is no event to wait on instead.
        while (left := (at - self.now()).total_seconds()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(left, self.slice_s))


class ManualClock:
    """A clock that moves only when told (see the module docstring)."""

    def __init__(self, start: datetime):
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start")
        self._now = start.astimezone(UTC)
        self._waiters: list[asyncio.Future[None]] = []

    def now(self) -> datetime:
        return self._now

    def set(self, at: datetime) -> None:
        """Move to ``at`` (never backwards) and wake the waiters whose time has come."""
        at = at.astimezone(UTC)
        if at < self._now:
            raise ValueError(f"a ManualClock does not go back ({at} < {self._now})")
        self._now = at
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def advance(self, by: timedelta) -> None:
        self.set(self._now + by)

    async def sleep_until(self, at: datetime) -> None:
        while self._now < at:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class FileClock:
    """The instant written in ``path`` (ISO 8601 with a timezone); a test aid (see the
    module docstring). A missing or unreadable file reads as the wall clock."""

    poll_s = 0.05

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def now(self) -> datetime:
        try:
            text = self.path.read_text().strip()
            at = datetime.fromisoformat(text)
        except (OSError, ValueError):
            return datetime.now(UTC)
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return at.astimezone(UTC)

    async def sleep_until(self, at: datetime) -> None:
        while self.now() < at:  # noqa: ASYNC110 - the file changes, no event says so
            await asyncio.sleep(self.poll_s)


def clock_from_env(environ: dict[str, str] | None = None) -> Clock:
    """A :class:`FileClock` when ``JOULEGATE_BATCH_CLOCK_FILE`` is set, else the wall clock."""
    path = (os.environ if environ is None else environ).get(CLOCK_FILE_ENV)
    return FileClock(path) if path else SystemClock()


def unix(at: datetime) -> int:
    """Whole seconds since the epoch, as OpenAI's objects give times."""
    return int(at.timestamp())


def from_unix(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
