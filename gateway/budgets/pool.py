"""A worker's pool of reserved joules: most reservations made in memory.

A reservation in the embedded ledger is a write transaction, and so is its settle: about a
quarter of a millisecond of the budgeted request path. When a tenant's windows have far
more room than one request needs, the ledger reserves a *pool* for this worker in the same
transaction as a request's own reservation (one row in ``reservations``, held in every
window like any reservation), and the next requests hold from it in memory. A settle still
goes to the ledger, exactly and group-committed as before: it spends, and moves the
request's hold out of the pool's row and out of the windows' reserved joules, in one
transaction, so the row always holds what the pool has not handed out for good. A request
that never ran gives its hold back to the pool. Pools are made for joule windows only (a
window counted in another unit converts at a factor that changes; those tenants are
reserved request by request).

The pool is sized so that it can never matter much: at most :data:`FRACTION` of the room
left in the tightest window and at most :data:`MOST_REQUESTS` requests like the one that
made it, and only made where that is at least :data:`LEAST_REQUESTS` of them (so a budget
near its end, or one as small as a few requests, is reserved request by request, exactly
as without pools). What a pool holds counts as reserved in the ledger, so several
workers, each with its own pool, never spend past a window; a worker's own readings
(``status``: the budget API, the gauges) leave out the part of its pools no request holds,
so they show what requests in flight hold, as without pools (another worker's pool shows
as reserved until it is released). A pool is retired
when a request does not fit in it (the request then takes the ledger's own path, which
may make a new pool), when it has been idle :data:`IDLE_S`, at half the reservation TTL
and at its windows' period end; its row is released once its last hold is back. A worker
that dies leaves its pool's row to expire like any request's reservation. While another
process holds the ledger file's lock, requests that fit in the pool are still served
(their joules are reserved already; ``on_unavailable`` applies to the others), and their
settles wait and are retried like any settle. (A request id
held from a pool is not looked up among the ledger's rows: the gateway's ids are unique.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .ledger import Limit, Reservation, WindowState

#: The most a pool holds, as a share of the room left in the tightest window.
FRACTION = 0.01
#: A pool holds at most this many requests like the one that made it ...
MOST_REQUESTS = 64
#: ... and is made only where it can hold at least this many.
LEAST_REQUESTS = 8
#: A pool no request has held from for this long is released.
IDLE_S = 2.0

#: (window, period start, ledger amount per IT joule) of each bucket a reservation holds.
Periods = list[tuple[str, int, float]]
#: What a pool serves: the tenant and its limits as given (a reloaded policy or a changed
#: unit factor is another pool).
Key = tuple[str, tuple[Limit, ...]]


def pool_key(tenant: str, limits: list[Limit]) -> Key:
    return tenant, tuple(limits)


def pool_size(joules: float, windows: list[WindowState]) -> float:
    """The joules of a pool made beside a reservation of ``joules`` that left ``windows``;
    0: none (also where a window is not counted in joules)."""
    if joules <= 0 or not windows or any(w.factor != 1.0 for w in windows):
        return 0.0
    room = min(w.remaining for w in windows)
    size = min(room * FRACTION, MOST_REQUESTS * joules)
    return float(int(size)) if size >= LEAST_REQUESTS * joules and size >= 1 else 0.0


@dataclass(eq=False, slots=True)
class Pool:
    """One pool: its row in the ledger (``lease_id``, ``size`` IT joules held in the
    buckets of ``periods``) and the requests holding from it now."""

    lease_id: str
    tenant: str
    key: Key
    periods: Periods
    size: float
    #: The windows as the transaction that made the pool left them (the pool included).
    windows: list[WindowState]
    #: No hold is taken from it at or after this time; its row expires at ``expires_at``
    #: (ledger clock).
    valid_until: float
    expires_at: float
    #: What its row holds that no request holds (whole nanojoules): the room for the next
    #: holds while it is not retired, and what this worker's readings
    #: (:meth:`EmbeddedLedger.status`) do not count as reserved.
    unheld: float = field(init=False)
    #: request id → the IT joules it holds.
    holds: dict[str, float] = field(default_factory=dict)
    #: IT joules its holders have spent since it was made, and the holds those settles took
    #: out of its row (committed).
    spent: float = 0.0
    consumed: float = 0.0
    retired: bool = False
    used_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.unheld = self.size

    def take(self, request_id: str, joules: float, at: float) -> Reservation | None:
        """Hold ``joules`` for ``request_id``, or None (retired, too late, no room)."""
        joules = round(joules, 9)  # whole nanojoules, as the ledger keeps them
        if self.retired or at >= self.valid_until or not 0 < joules <= self.unheld:
            return None
        self.unheld = round(self.unheld - joules, 9)
        self.holds[request_id] = joules
        self.used_at = time.monotonic()
        return Reservation(True, request_id, joules, self.seen())

    def seen(self) -> list[WindowState]:
        """The windows as this worker knows them now: what its holders' settles moved, and
        the pool's unheld part not counted as reserved."""
        return [WindowState(w.window, w.period_start, w.period_end, w.limit,
                            round(w.spent + self.spent, 9),
                            round(max(w.reserved - self.consumed - self.unheld, 0.0), 9),
                            w.granted, w.factor, w.unit) for w in self.windows]

    def settled(self, request_id: str, spent: float) -> None:
        """``request_id``'s settle committed: its hold left the pool's row for good."""
        joules = self.holds.pop(request_id)
        self.spent += spent
        self.consumed += joules

    def returned(self, request_id: str) -> None:
        """``request_id`` never ran: its hold is the pool's again (its row still holds it)."""
        self.unheld = round(self.unheld + self.holds.pop(request_id), 9)

    def retire(self) -> None:
        self.retired = True

    @property
    def drained(self) -> bool:
        """Retired with nothing held: its row can be released."""
        return self.retired and not self.holds

    def stale(self, now_monotonic: float, at: float, idle_s: float = IDLE_S) -> bool:
        """Time to retire it: past its time, or idle for ``idle_s``."""
        return at >= self.valid_until or (not self.holds
                                          and now_monotonic - self.used_at >= idle_s)
