"""The joule ledger: reserve before a request runs, settle with what it measured.

Per tenant, window and period the ledger keeps ``spent`` (settled joules), ``reserved``
(joules held by requests in flight) and ``granted`` (extra joules an admin added). A
request reserves its predicted joules against every window at once, atomically: either
all windows have room (``limit + granted - spent - reserved >= joules``) and all are
charged, or none is. When it ends it settles with the joules it actually used (its
reservation is returned and the measured joules are spent, in the periods it reserved
in), or releases the reservation if it never ran. Settling is idempotent by request id.
A reservation that is neither settled nor released by ``expires_at`` (a crashed gateway)
expires and returns to the budget; a late settle still records the joules as spent.

A window may count another unit than IT joules (facility kWh, litres of water, grams of
CO₂; :mod:`gateway.sustainability`). Its :class:`Limit` then carries ``factor``, the
window's ledger amount per IT joule at reservation time (its unit's joule-equivalents);
the reservation holds ``joules × factor`` there, keeps the factor, and its settle spends
``measured joules × the same factor``, so a window stays exact in its own unit.

Both implementations (:mod:`.embedded`, :mod:`.redis`) pass the same behavioural tests.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Limit:
    window: str
    #: The window's budget as a ledger amount (IT joules, or its unit's joule-equivalents).
    joules: float
    #: Ledger amount per IT joule of a request (1 for a joule window).
    factor: float = 1.0
    unit: str = "joules"


@dataclass(slots=True)
class WindowState:
    window: str
    period_start: int
    period_end: int
    limit: float
    spent: float = 0.0
    reserved: float = 0.0
    granted: float = 0.0
    #: The window's :attr:`Limit.factor` and unit in this call.
    factor: float = 1.0
    unit: str = "joules"

    @property
    def remaining(self) -> float:
        return self.limit + self.granted - self.spent - self.reserved


@dataclass(slots=True)
class Reservation:
    ok: bool
    request_id: str
    joules: float
    #: Every window's state after the call (before it, when refused).
    windows: list[WindowState] = field(default_factory=list)
    #: The first window without room, when refused.
    short: WindowState | None = None

    def retry_after_s(self, now: float) -> float | None:
        """Seconds until the refusing window's period ends (and its spend resets)."""
        return None if self.short is None else max(self.short.period_end - now, 0.0)


class LedgerUnavailable(Exception):
    """The ledger's store cannot be reached (e.g. Redis is down)."""


class Ledger(abc.ABC):
    """One tenant-keyed store of budget periods and reservations."""

    @abc.abstractmethod
    async def reserve(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                      ttl_s: float, now: float | None = None) -> Reservation:
        """Hold ``joules`` in every window of ``limits``, or in none."""

    @abc.abstractmethod
    async def settle(self, tenant: str, request_id: str, joules: float) -> bool:
        """Spend the measured ``joules`` and return the reservation. False if the request is
        unknown or already settled/released (nothing changes then)."""

    @abc.abstractmethod
    async def release(self, tenant: str, request_id: str) -> bool:
        """Return the reservation unspent (the request never ran). False if unknown/done."""

    @abc.abstractmethod
    async def record(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                     now: float) -> bool:
        """Spend ``joules`` at time ``now`` without a reservation (spend counted while the
        ledger was unreachable). Idempotent by request id: False if already known."""

    @abc.abstractmethod
    async def status(self, tenant: str, limits: list[Limit],
                     now: float | None = None) -> list[WindowState]:
        """Each window's current period: spent, reserved, granted, remaining."""

    @abc.abstractmethod
    async def grant(self, tenant: str, window: str, joules: float, now: float | None = None) -> None:
        """Add ``joules`` to the tenant's current period of ``window``."""

    @abc.abstractmethod
    async def reset(self, tenant: str, windows: list[str], now: float | None = None) -> None:
        """Forget the current period's spend and grants in ``windows``. Reservations in
        flight stay held."""

    @abc.abstractmethod
    async def expire(self, now: float | None = None) -> int:
        """Return reservations past their expiry to the budget; how many expired."""

    def settle_soon(self, tenant: str, request_id: str,
                    joules: float) -> asyncio.Future[bool] | None:
        """Start :meth:`settle` now without waiting for it, when this ledger applies its
        operations in the order they were started (so whatever the gateway asks of it
        afterwards sees this settle done): the future of its result. None when the ledger
        cannot promise that order; the caller then awaits :meth:`settle`."""
        return None

    async def maintain(self) -> None:  # noqa: B027 - optional hook
        """Housekeeping off the request path (the budget guard calls it every second);
        must not raise."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""
