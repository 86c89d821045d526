"""The embedded ledger: a local SQLite file, no server.

Every operation is one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock
up front, so a reservation checks and charges all of a tenant's windows atomically —
also between several worker processes on one host sharing the file (WAL mode). Spend
and reservations survive a restart; reservations past their expiry are returned by
:meth:`status` (the budget guard reads it every second), by :meth:`expire`, and by a
reservation that would otherwise be short.

The request path is kept to a few statements: a reservation inserts its row and charges
each window with one conditional ``UPDATE ... RETURNING`` (charged only if the bucket exists
and has room); when one does not, the transaction is rolled back and the full path runs
(return expired holds, create missing buckets, say which window is short). A settle closes
the reservation and moves its joules from reserved to spent in one statement per window; a
settle the answer does not wait for (:meth:`EmbeddedLedger.settle_soon`) is group-committed:
it waits (at most :data:`SETTLE_WAIT_S`) for the next operation and is applied first in that
operation's transaction, the operation itself inside a savepoint; with none in that time it
is applied on its own, together with any other settles handed over meanwhile. A request's
settle thus usually shares the next request's reservation commit: one commit per request
instead of two.

Where a tenant's windows have room for many requests, most reservations are not made here
at all: a worker's *pool* (:mod:`.pool`), reserved beside one request's reservation, holds
joules for the next ones in memory, and their settles take their holds out of it. The
budgeted path then costs one group-committed settle per request instead of a reservation
and a settle.

No SQLite call waits on the event loop. Operations run one after another, in the order
they were started, on one connection: when nothing is queued and the write lock is free,
an operation runs at once on the caller's thread in one short transaction that never
waits (handing it to a thread and back would cost more than the transaction); else it is
queued for the ledger's one worker thread, which may wait for the lock. While another process holds the write lock (a second
worker in a long transaction, ``joulegate budget`` on the command line), an operation
waits at most ``busy_timeout_ms`` per attempt, makes up to ``attempts`` attempts with a
short backoff between them, and then raises :class:`LedgerUnavailable`, so the policy's
``on_unavailable`` applies exactly as when Redis is down. An operation that already
waited its whole allowance in the queue (behind others that were waiting for the lock)
makes one attempt that does not wait: a locked file answers at once instead of keeping
every queued request waiting in turn. Any other SQLite failure (I/O error, a corrupt or
unreadable file) is :class:`LedgerUnavailable` too, and the connection is reopened on the
next operation.

Checkpoints (copying the write-ahead log back into the database file, with its fsyncs)
are kept off the request path: :meth:`EmbeddedLedger.maintain` (the budget guard calls it
every second) checkpoints on a connection and thread of its own, which WAL lets run beside
the writers; only when that could not catch up with a log past
:data:`_BACKSTOP_CHECKPOINT_PAGES` (writes all the time) does it queue one checkpoint for
the worker thread, which completes it. (SQLite's default, a checkpoint inside whichever
commit crosses 1000 pages, cost every commit about 80 µs on average here and put a few
milliseconds, two fsyncs, into every hundredth request or so.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .ledger import Ledger, LedgerUnavailable, Limit, Reservation, WindowState
from .pool import IDLE_S as POOL_IDLE_S
from .pool import Periods, Pool, pool_key, pool_size
from .windows import period

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    tenant TEXT NOT NULL, window TEXT NOT NULL, period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL, spent REAL NOT NULL DEFAULT 0,
    reserved REAL NOT NULL DEFAULT 0, granted REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, window, period_start));
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, joules REAL NOT NULL,
    periods TEXT NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS reservations_active ON reservations (state, expires_at);
"""
#: Finished reservations and past periods are kept this long (late settles, audits).
_KEEP_S = 40 * 86400
#: The oldest SQLite with ``UPDATE ... RETURNING``, which the request path uses.
_SQLITE_NEEDED = (3, 35, 0)
#: The first pause between two attempts on a locked file; it doubles.
_RETRY_PAUSE_S = 0.01
#: The longest a settle handed to :meth:`EmbeddedLedger.settle_soon` waits for an operation to
#: share a transaction with (a budget read elsewhere, by another worker or the command line,
#: may lag the answers by this much; a process killed in it loses those settles).
SETTLE_WAIT_S = 0.005
#: Pages of write-ahead log (10 MB with the 1 KB pages of new files, 40 MB with SQLite's
#: default 4 KB pages of older ones) past which :meth:`EmbeddedLedger.maintain` has the
#: worker thread checkpoint; a commit itself checkpoints only past four times that (when
#: nothing has called ``maintain`` for a long while).
_BACKSTOP_CHECKPOINT_PAGES = 10_000

T = TypeVar("T")


class _Short(Exception):
    """The one-statement charge of :meth:`EmbeddedLedger.reserve` found a bucket missing or
    short: roll it back and take the full path."""


class _Locked(Exception):
    """Another connection holds the write lock (an operation that may not wait for it)."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock we need."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class EmbeddedLedger(Ledger):
    def __init__(self, path: str | Path, busy_timeout_ms: int = 250, attempts: int = 3):
        if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
            raise RuntimeError(
                f"the embedded ledger needs SQLite {'.'.join(map(str, _SQLITE_NEEDED))} or "
                f"newer (UPDATE ... RETURNING); this Python's sqlite3 is {sqlite3.sqlite_version}."
                " Use a Python built against a newer SQLite, or a Redis ledger (ledger: {kind: redis})")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_ms / 1000
        self.attempts = max(attempts, 1)
        #: The most an operation waits, queued and on the lock, before it gives up.
        self.allowance_s = self.attempts * self.busy_timeout_s + \
            _RETRY_PAUSE_S * (2 ** (self.attempts - 1) - 1)
        #: The connection (see :meth:`_submit` for which thread uses it when).
        self._db: sqlite3.Connection | None = None
        self._db_timeout_ms = -1
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-ledger")
        self._closed = False
        #: The checkpointer's own thread and connection (:meth:`maintain`).
        self._checkpointer = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="joulegate-ledger-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        #: Operations queued for the worker thread and not yet done (loop thread only).
        self._queued = 0
        #: Settles handed over by :meth:`settle_soon` and not started yet (loop thread only):
        #: applied first in the transaction of the next operation, or on their own when none
        #: starts within :data:`SETTLE_WAIT_S` (``_soon_timer``).
        self._soon: list[tuple[Callable[[sqlite3.Connection], bool], asyncio.Future[bool]]] = []
        self._soon_timer: asyncio.TimerHandle | None = None
        #: This worker's pools (:mod:`.pool`) by what they serve, and which pool each
        #: request holding from one holds from (loop thread only).
        self._pools: dict[Any, Pool] = {}
        self._pooled: dict[str, Pool] = {}
        #: A pool idle this long is released by :meth:`maintain`.
        self.pool_idle_s = POOL_IDLE_S

    # -- the worker thread ------------------------------------------------------------------

    async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation(connection)`` in the worker thread, inside the retry policy."""
        return await self._submit(operation)

    def _submit(self, operation: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Start ``operation`` now, after every operation started before it; its future.

        When the worker thread has nothing queued and the write lock is free, it runs at
        once on the calling thread (one short transaction that never waits: a thread hop
        costs more than the transaction); otherwise it is queued for the worker thread,
        which waits for the lock under the retry policy. Settles handed over before it
        (:meth:`settle_soon`) are applied first, in the same transaction."""
        if self._closed:
            raise LedgerUnavailable(f"the embedded ledger {self.path} is closed")
        if self._queued or self._db is None:
            return self._queue(operation)
        batch = self._take_soon()
        if batch is not None:
            operation = batch.then(operation)
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            done.set_result(self._at_once(self._db, operation))
        except _Locked:
            done = self._queue(operation)
        except Exception as exc:  # noqa: BLE001 - the caller gets it from the future
            done.set_exception(exc)
        if batch is not None:
            batch.resolve_when(done)
        return done

    def _queue(self, operation: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``operation`` for the worker thread (operations run in the order they were
        queued); its future. Settles handed over before it go first, in its transaction."""
        if self._closed:
            raise LedgerUnavailable(f"the embedded ledger {self.path} is closed")
        batch = self._take_soon()
        if batch is not None:
            operation = batch.then(operation)
        deadline = time.monotonic() + self.allowance_s
        future = asyncio.get_running_loop().run_in_executor(
            self._worker, self._attempts, operation, deadline)
        self._queued += 1
        future.add_done_callback(self._dequeued)
        if batch is not None:
            batch.resolve_when(future)
        return future

    def _dequeued(self, _: asyncio.Future[Any]) -> None:
        self._queued -= 1

    def _at_once(self, db: sqlite3.Connection, operation: Callable[[sqlite3.Connection], T]) -> T:
        """``operation`` on the calling thread without waiting for the write lock: raises
        :class:`_Locked` (nothing done) when another connection holds it."""
        if db.in_transaction:
            raise _Locked
        self._busy_timeout(db, 0.0)
        try:
            return operation(db)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise _Locked from None
            self._drop()
            raise LedgerUnavailable(f"the embedded ledger {self.path} failed: {exc}") from exc
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # a bug, not an unavailable store
        except sqlite3.DatabaseError as exc:
            self._drop()
            raise LedgerUnavailable(f"the embedded ledger {self.path} failed: {exc}") from exc

    def _attempts(self, operation: Callable[[sqlite3.Connection], T], deadline: float) -> T:
        pause = _RETRY_PAUSE_S
        last: sqlite3.OperationalError | None = None
        for attempt in range(self.attempts):
            remaining = deadline - time.monotonic()
            if attempt > 0 and remaining <= 0:
                break
            try:
                db = self._connection()
                self._busy_timeout(db, max(min(self.busy_timeout_s, remaining), 0.0))
                return operation(db)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    self._drop()
                    raise LedgerUnavailable(f"the embedded ledger {self.path} failed: "
                                            f"{exc}") from exc
                last = exc
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
                raise  # a bug, not an unavailable store
            except sqlite3.DatabaseError as exc:
                self._drop()
                raise LedgerUnavailable(f"the embedded ledger {self.path} failed: "
                                        f"{exc}") from exc
            time.sleep(max(min(pause, deadline - time.monotonic()), 0.0))
            pause *= 2
        raise LedgerUnavailable(
            f"the embedded ledger {self.path} is locked by another process (gave up after "
            f"{self.allowance_s * 1000:.0f} ms): {last}")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            # Used by the worker thread, and by the loop's thread while the worker is idle
            # (:meth:`_submit`): never by both at once.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA page_size=1024")  # before the first table: new files only
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA wal_autocheckpoint={4 * _BACKSTOP_CHECKPOINT_PAGES}")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db, self._db_timeout_ms = db, -1
        if self._db.in_transaction:  # a failed ROLLBACK left one open: start afresh
            self._drop()
            return self._connection()
        return self._db

    def _busy_timeout(self, db: sqlite3.Connection, seconds: float) -> None:
        ms = int(seconds * 1000)
        if ms != self._db_timeout_ms:
            db.execute(f"PRAGMA busy_timeout={ms}")
            self._db_timeout_ms = ms

    def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- helpers (in the worker thread, inside a transaction) --------------------------------

    @staticmethod
    def _bucket(db: sqlite3.Connection, tenant: str, limit: Limit, now: float) -> WindowState:
        start, end = period(limit.window, now)
        db.execute("INSERT OR IGNORE INTO buckets (tenant, window, period_start, period_end)"
                   " VALUES (?, ?, ?, ?)", (tenant, limit.window, start, end))
        spent, reserved, granted = db.execute(
            "SELECT spent, reserved, granted FROM buckets WHERE tenant=? AND window=? AND "
            "period_start=?", (tenant, limit.window, start)).fetchone()
        return WindowState(limit.window, start, end, limit.joules, spent, reserved, granted,
                           limit.factor, limit.unit)

    @staticmethod
    def _periods(raw: str) -> Periods:
        """A reservation's buckets (rows written before units existed have no factor: 1)."""
        return [(str(p[0]), int(p[1]), float(p[2]) if len(p) > 2 else 1.0)
                for p in orjson.loads(raw)]

    @staticmethod
    def _unreserve(db: sqlite3.Connection, tenant: str, periods: Periods, joules: float) -> None:
        for window, start, factor in periods:
            db.execute("UPDATE buckets SET reserved = MAX(ROUND(reserved - ?, 9), 0) "
                       "WHERE tenant=? AND window=? AND period_start=?",
                       (_held(joules, factor), tenant, window, start))

    def _expire(self, db: sqlite3.Connection, now: float, tenant: str | None = None) -> int:
        query = "SELECT request_id, tenant, joules, periods FROM reservations " \
                "WHERE state='active' AND expires_at <= ?"
        args: tuple[float] | tuple[float, str] = (now,)
        if tenant is not None:
            query += " AND tenant=?"
            args = (now, tenant)
        stale = db.execute(query, args).fetchall()
        for request_id, owner, joules, periods in stale:
            self._unreserve(db, owner, self._periods(periods), joules)
            db.execute("UPDATE reservations SET state='expired' WHERE request_id=?",
                       (request_id,))
        return len(stale)

    def _checkpoint(self) -> int:
        """One passive checkpoint (it never waits for a lock, never blocks the writers), on
        the checkpointer's connection: the pages of log it left behind. A failure drops that
        connection, and the next :meth:`maintain` tries again."""
        try:
            if self._checkpoint_db is None:
                if not self.path.exists():
                    return 0
                self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None,
                                                      timeout=0)
            # fetchall: a statement left unfinished would hold a read lock, and a log that a
            # reader still uses is never restarted
            [(_, log, done)] = self._checkpoint_db.execute(
                "PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            return max(log - done, 0) if log >= _BACKSTOP_CHECKPOINT_PAGES else 0
        except sqlite3.Error:
            self._drop_checkpointer()
            return 0

    def _drop_checkpointer(self) -> None:
        db, self._checkpoint_db = self._checkpoint_db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- the interface ----------------------------------------------------------------------

    async def maintain(self) -> None:
        """Retire pools idle for :attr:`pool_idle_s` or past their time, and checkpoint the
        write-ahead log beside the request path (see the module docstring); never raises."""
        if self._closed:
            return
        now, at = time.monotonic(), time.time()
        for pool in [p for p in self._pools.values() if p.stale(now, at, self.pool_idle_s)]:
            self._retire(pool)
        left = await asyncio.get_running_loop().run_in_executor(self._checkpointer,
                                                                self._checkpoint)
        if left and not self._closed:
            with contextlib.suppress(LedgerUnavailable):
                await self._queue(_checkpoint_here)

    async def reserve(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                      ttl_s: float, now: float | None = None) -> Reservation:
        at = time.time() if now is None else now
        key = pool_key(tenant, limits)
        if request_id in self._pooled:
            raise ValueError(f"request id {request_id!r} already has a reservation")
        pool = self._pools.get(key)
        if pool is not None:
            held = pool.take(request_id, joules, at)
            if held is not None:
                self._pooled[request_id] = pool
                return held
            self._retire(pool)  # no room, or too late: the ledger's path makes another

        def charge(db: sqlite3.Connection) -> tuple[Reservation, Pool | None]:
            """The common case in one statement per window: each bucket is charged only
            where it exists and has room (``_Short`` rolls everything back otherwise)."""
            with _Immediate(db):
                periods: Periods = [(limit.window, period(limit.window, at)[0], limit.factor)
                                    for limit in limits]
                try:
                    db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, 'active')",
                               (request_id, tenant, joules, _dumps(periods), at + ttl_s))
                except sqlite3.IntegrityError:
                    raise ValueError(f"request id {request_id!r} already has a "
                                     "reservation") from None
                states = []
                for limit, (window, start, factor) in zip(limits, periods, strict=True):
                    need = _held(joules, factor)
                    row = db.execute(
                        "UPDATE buckets SET reserved = ROUND(reserved + ?, 9) WHERE tenant=? "
                        "AND window=? AND period_start=? AND ? + granted - spent - reserved >= ?"
                        " RETURNING period_end, spent, reserved, granted",
                        (need, tenant, window, start, limit.joules, need)).fetchone()
                    if row is None:  # no bucket for this period yet, or not enough room
                        raise _Short
                    states.append(WindowState(window, start, row[0], limit.joules, row[1],
                                              row[2], row[3], factor, limit.unit))
                done = Reservation(True, request_id, joules, states)
                return done, new_pool(db, done)

        def reserve(db: sqlite3.Connection) -> tuple[Reservation, Pool | None]:
            """Every case: hand back the tenant's expired holds, create missing buckets,
            and say which window is short."""
            with _Immediate(db):
                self._expire(db, at, tenant)
                if db.execute("SELECT 1 FROM reservations WHERE request_id=?",
                              (request_id,)).fetchone():
                    raise ValueError(f"request id {request_id!r} already has a reservation")
                states = [self._bucket(db, tenant, limit, at) for limit in limits]
                short = next((s for s in states if s.remaining < _held(joules, s.factor)), None)
                if short is not None:
                    return Reservation(False, request_id, joules, states, short), None
                for state in states:
                    need = _held(joules, state.factor)
                    db.execute("UPDATE buckets SET reserved = ROUND(reserved + ?, 9) WHERE "
                               "tenant=? AND window=? AND period_start=?",
                               (need, tenant, state.window, state.period_start))
                    state.reserved = round(state.reserved + need, 9)
                periods = [[s.window, s.period_start, s.factor] for s in states]
                db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, 'active')",
                           (request_id, tenant, joules, _dumps(periods), at + ttl_s))
                done = Reservation(True, request_id, joules, states)
                return done, new_pool(db, done)

        def new_pool(db: sqlite3.Connection, done: Reservation) -> Pool | None:
            """Beside a reservation that left plenty of room, in its transaction: a pool,
            held like it."""
            size = pool_size(joules, done.windows)
            if not size:
                return None
            lease = f"pool:{uuid.uuid4().hex}"
            periods: Periods = [(w.window, w.period_start, w.factor) for w in done.windows]
            windows = []
            for w in done.windows:
                row = db.execute(
                    "UPDATE buckets SET reserved = ROUND(reserved + ?, 9) WHERE tenant=? AND "
                    "window=? AND period_start=? RETURNING spent, reserved, granted",
                    (_held(size, w.factor), tenant, w.window, w.period_start)).fetchone()
                windows.append(WindowState(w.window, w.period_start, w.period_end, w.limit,
                                           row[0], row[1], row[2], w.factor, w.unit))
            db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, 'active')",
                       (lease, tenant, size, _dumps(periods), at + ttl_s))
            valid = min([at + ttl_s / 2] + [w.period_end for w in windows])
            return Pool(lease, tenant, key, periods, size, windows, valid, at + ttl_s)

        def charge_or_reserve(db: sqlite3.Connection) -> tuple[Reservation, Pool | None]:
            try:
                return charge(db)
            except _Short:
                return reserve(db)

        done, made = await self._call(charge_or_reserve)
        if made is not None:
            old = self._pools.get(key)
            if old is not None:
                self._retire(old)
            self._pools[key] = made
        return done

    # -- pools (see :mod:`.pool`) --------------------------------------------------------

    def _retire(self, pool: Pool) -> None:
        """No more holds from ``pool``; its row is released once nothing holds from it."""
        pool.retire()
        if self._pools.get(pool.key) is pool:
            del self._pools[pool.key]
        if pool.drained:
            self._release_pool(pool)

    def _release_pool(self, pool: Pool) -> None:
        """Release a drained pool's row with the next operation's transaction (a failure
        leaves the row to expire, as a crashed worker's would)."""
        if not self._closed:
            self._soon_add(self._finish(pool.tenant, pool.lease_id, None)).add_done_callback(
                _quiet)

    def _spend(self, pool: Pool, request_id: str,
               joules: float) -> Callable[[sqlite3.Connection], bool]:
        """A pooled request's settle inside the caller's transaction: its hold leaves the
        pool's row and the buckets' reserved joules, and ``joules`` are spent; when the row
        has expired (it handed everything back then), only spent."""
        tenant, periods, lease = pool.tenant, pool.periods, pool.lease_id
        held = pool.holds[request_id]

        def spend(db: sqlite3.Connection) -> bool:
            active = db.execute("UPDATE reservations SET joules = MAX(ROUND(joules - ?, 9), 0) "
                                "WHERE request_id=? AND state='active' RETURNING 1",
                                (held, lease)).fetchone()
            for window, start, _ in periods:
                if active:
                    db.execute("UPDATE buckets SET reserved = MAX(ROUND(reserved - ?, 9), 0),"
                               " spent = ROUND(spent + ?, 9) WHERE tenant=? AND window=? AND "
                               "period_start=?", (held, joules, tenant, window, start))
                else:
                    db.execute("UPDATE buckets SET spent = ROUND(spent + ?, 9) WHERE "
                               "tenant=? AND window=? AND period_start=?",
                               (joules, tenant, window, start))
            return True

        return spend

    def _pool_of(self, tenant: str, request_id: str) -> Pool | None:
        """The pool ``request_id`` holds from (None: it holds a reservation of its own)."""
        pool = self._pooled.get(request_id)
        return pool if pool is not None and pool.tenant == tenant else None

    def _pooled_done(self, request_id: str, pool: Pool, spent: float | None) -> None:
        """A pooled request is done: its settle committed (``spent``), or it never ran."""
        if self._pooled.pop(request_id, None) is None:
            return
        if spent is None:
            pool.returned(request_id)
        else:
            pool.settled(request_id, spent)
        if pool.drained:
            self._release_pool(pool)

    def _finish(self, tenant: str, request_id: str,
                spend: float | None) -> Callable[[sqlite3.Connection], bool]:
        """Close the request's hold, spending ``spend`` (None: release it unspent), inside
        the caller's transaction: False when there is no hold (unknown, or closed already)."""
        state = "settled" if spend is not None else "released"

        def finish(db: sqlite3.Connection) -> bool:
            # The common case, an active reservation, is closed by the same statement that
            # reads it; an expired one (its hold already handed back) only spends.
            row = db.execute("UPDATE reservations SET state=? WHERE request_id=? AND "
                             "tenant=? AND state='active' RETURNING joules, periods",
                             (state, request_id, tenant)).fetchone()
            held = row is not None
            if row is None:
                row = db.execute("UPDATE reservations SET state=? WHERE request_id=? AND "
                                 "tenant=? AND state='expired' RETURNING joules, periods",
                                 (state, request_id, tenant)).fetchone()
                if row is None:  # unknown, or settled/released already
                    return False
            joules, periods = row[0], self._periods(row[1])
            for window, start, factor in periods:
                if held:
                    db.execute("UPDATE buckets SET reserved = MAX(ROUND(reserved - ?, 9), 0),"
                               " spent = ROUND(spent + ?, 9) WHERE tenant=? AND window=? AND "
                               "period_start=?", (_held(joules, factor), (spend or 0.0) * factor,
                                                  tenant, window, start))
                elif spend is not None:
                    db.execute("UPDATE buckets SET spent = ROUND(spent + ?, 9) WHERE "
                               "tenant=? AND window=? AND period_start=?",
                               (spend * factor, tenant, window, start))
            return True

        return finish

    async def _close_hold(self, tenant: str, request_id: str, spend: float | None) -> bool:
        finish = self._finish(tenant, request_id, spend)

        def in_transaction(db: sqlite3.Connection) -> bool:
            with _Immediate(db):
                return finish(db)

        return await self._call(in_transaction)

    async def settle(self, tenant: str, request_id: str, joules: float) -> bool:
        spend = max(joules, 0.0)
        pool = self._pool_of(tenant, request_id)
        if pool is None:
            return await self._close_hold(tenant, request_id, spend)
        operation = self._spend(pool, request_id, spend)

        def in_transaction(db: sqlite3.Connection) -> bool:
            with _Immediate(db):
                return operation(db)

        await self._call(in_transaction)  # raises: still held, the caller tries again
        self._pooled_done(request_id, pool, spend)
        return True

    def settle_soon(self, tenant: str, request_id: str, joules: float) -> asyncio.Future[bool]:
        """Ordered before any operation started after it (see :meth:`Ledger.settle_soon`):
        applied first in that operation's transaction, or, when none starts within
        :data:`SETTLE_WAIT_S`, on its own together with the other settles handed over by
        then. Either way after the answer being finished has been written."""
        if self._closed:
            raise LedgerUnavailable(f"the embedded ledger {self.path} is closed")
        spend = max(joules, 0.0)
        pool = self._pool_of(tenant, request_id)
        if pool is None:
            return self._soon_add(self._finish(tenant, request_id, spend))
        future = self._soon_add(self._spend(pool, request_id, spend))

        def committed(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._pooled_done(request_id, pool, spend)

        future.add_done_callback(committed)
        return future

    def _soon_add(self, finish: Callable[[sqlite3.Connection], bool]) -> asyncio.Future[bool]:
        """Hand ``finish`` over to the next operation's transaction (or, within
        :data:`SETTLE_WAIT_S`, one of its own with the others handed over by then)."""
        loop = asyncio.get_running_loop()
        if not self._soon:
            self._soon_timer = loop.call_later(SETTLE_WAIT_S, self._start_soon)
        future: asyncio.Future[bool] = loop.create_future()
        self._soon.append((finish, future))
        return future

    def _take_soon(self) -> _Settles | None:
        """The settles handed over and not started yet, now taken (None: there are none)."""
        if not self._soon:
            return None
        soon, self._soon = self._soon, []
        if self._soon_timer is not None:
            self._soon_timer.cancel()
            self._soon_timer = None
        return _Settles(soon)

    def _start_soon(self) -> None:
        """Apply the settles handed over so far, in a transaction of their own."""
        if not self._soon:
            return
        try:
            self._submit(_nothing)
        except LedgerUnavailable as exc:  # closed meanwhile
            soon, self._soon = self._soon, []
            for _, future in soon:
                if not future.done():
                    future.set_exception(exc)

    async def release(self, tenant: str, request_id: str) -> bool:
        pool = self._pool_of(tenant, request_id)
        if pool is None:
            return await self._close_hold(tenant, request_id, None)
        self._pooled_done(request_id, pool, None)
        return True

    async def record(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                     now: float) -> bool:
        def record(db: sqlite3.Connection) -> bool:
            with _Immediate(db):
                if db.execute("SELECT 1 FROM reservations WHERE request_id=?",
                              (request_id,)).fetchone():
                    return False
                states = [self._bucket(db, tenant, limit, now) for limit in limits]
                for state in states:
                    db.execute("UPDATE buckets SET spent = ROUND(spent + ?, 9) WHERE tenant=? "
                               "AND window=? AND period_start=?",
                               (joules * state.factor, tenant, state.window, state.period_start))
                periods = [[s.window, s.period_start, s.factor] for s in states]
                db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, 'settled')",
                           (request_id, tenant, joules, _dumps(periods), now))
            return True

        return await self._call(record)

    async def status(self, tenant: str, limits: list[Limit],
                     now: float | None = None) -> list[WindowState]:
        at = time.time() if now is None else now

        def status(db: sqlite3.Connection) -> list[WindowState]:
            with _Immediate(db):
                self._expire(db, at, tenant)
                return [self._bucket(db, tenant, limit, at) for limit in limits]

        states = await self._call(status)
        for pool in {*self._pools.values(), *self._pooled.values()}:
            if pool.tenant != tenant or at >= pool.expires_at:
                continue  # an expired row has handed everything back already
            unheld = pool.unheld
            for state in states:
                if (state.window, state.period_start, state.factor) in pool.periods:
                    state.reserved = round(max(state.reserved - unheld, 0.0), 9)
        return states

    async def grant(self, tenant: str, window: str, joules: float, now: float | None = None) -> None:
        at = time.time() if now is None else now

        def grant(db: sqlite3.Connection) -> None:
            with _Immediate(db):
                state = self._bucket(db, tenant, Limit(window, 0.0), at)
                db.execute("UPDATE buckets SET granted = ROUND(granted + ?, 9) WHERE tenant=? "
                           "AND window=? AND period_start=?",
                           (joules, tenant, window, state.period_start))

        await self._call(grant)

    async def reset(self, tenant: str, windows: list[str], now: float | None = None) -> None:
        at = time.time() if now is None else now

        def reset(db: sqlite3.Connection) -> None:
            with _Immediate(db):
                for w in windows:
                    start, _ = period(w, at)
                    db.execute("UPDATE buckets SET spent=0, granted=0 WHERE tenant=? AND "
                               "window=? AND period_start=?", (tenant, w, start))

        await self._call(reset)

    async def expire(self, now: float | None = None) -> int:
        at = time.time() if now is None else now

        def expire(db: sqlite3.Connection) -> int:
            with _Immediate(db):
                count = self._expire(db, at)
                db.execute("DELETE FROM reservations WHERE state != 'active' AND expires_at < ?",
                           (at - _KEEP_S,))
                db.execute("DELETE FROM buckets WHERE period_end < ? AND reserved = 0",
                           (at - _KEEP_S,))
            return count

        # Always the worker thread: a sweep may delete many rows, too long for the loop.
        return await self._queue(expire)

    async def close(self) -> None:
        """Close the connection in its thread (after the operations queued before), then
        let the thread go. Safe to call twice."""
        if self._closed:
            return
        for pool in list(self._pools.values()):
            self._retire(pool)  # a pool still held from keeps its row until it expires
        self._start_soon()  # settles handed over are still applied
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._worker, self._drop)
            await loop.run_in_executor(self._checkpointer, self._drop_checkpointer)
        finally:
            self._worker.shutdown(wait=False)
            self._checkpointer.shutdown(wait=False)


def _held(joules: float, factor: float) -> float:
    """What a hold of ``joules`` puts in a bucket of ``factor``, in whole nanojoules: the
    same number is added when it is taken and subtracted when it is closed, so holds give
    back exactly what they took (an unrounded amount left 1e-9 behind now and then)."""
    return round(joules * factor, 9)


def _dumps(periods: Periods | list[list[Any]]) -> str:
    """A reservation's periods as the JSON text its row keeps."""
    return orjson.dumps(periods).decode()


def _checkpoint_here(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _nothing(_: sqlite3.Connection) -> None:
    """The operation that carries settles handed over, when nothing else comes to."""


def _quiet(done: asyncio.Future[bool]) -> None:
    """A pool's release failed: nothing to do (its row expires); the failure is read so it
    is not reported as never retrieved."""
    if not done.cancelled():
        done.exception()


class _Settles:
    """Settles handed over by :meth:`EmbeddedLedger.settle_soon`, applied at the start of
    another operation's transaction; each one's future learns its result once that
    transaction has committed (whatever the operation itself then raised)."""

    __slots__ = ("handed", "results")

    def __init__(self, handed: list[tuple[Callable[[sqlite3.Connection], bool],
                                          asyncio.Future[bool]]]) -> None:
        self.handed = handed
        #: Each settle's result, once committed (None until then).
        self.results: list[bool] | None = None

    def then(self, operation: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """``operation`` preceded by these settles in one transaction; its own transaction
        becomes a savepoint, so its failing (a short reservation, a duplicate id) rolls back
        only what it did."""

        def together(db: sqlite3.Connection) -> T:
            self.results = None  # a retried attempt starts afresh
            failure: Exception | None = None
            with _Immediate(db):
                results = [finish(db) for finish, _ in self.handed]
                try:
                    value = operation(db)
                except Exception as exc:  # noqa: BLE001 - raised once the settles commit
                    failure = exc
            self.results = results
            if failure is not None:
                raise failure
            return value

        return together

    def resolve_when(self, started: asyncio.Future[Any]) -> None:
        started.add_done_callback(self._resolve)

    def _resolve(self, started: asyncio.Future[Any]) -> None:
        results = self.results
        for i, (_, future) in enumerate(self.handed):
            if future.done():
                continue
            if results is not None:
                future.set_result(results[i])
            elif started.cancelled():
                future.cancel()
            else:
                future.set_exception(started.exception() or LedgerUnavailable(
                    "the embedded ledger did not apply the settle"))


class _Immediate:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` when the block or the commit
    fails); inside a transaction already open, a savepoint released or rolled back the same
    way. A class, not a generator context manager: it runs on every request."""

    __slots__ = ("db", "nested")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.nested = False

    def __enter__(self) -> None:
        if self.db.in_transaction:
            self.nested = True
            self.db.execute("SAVEPOINT operation")
        else:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        db = self.db
        if self.nested:
            if kind is not None:
                db.execute("ROLLBACK TO operation")
            db.execute("RELEASE operation")
            return
        if kind is None:
            try:
                db.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
