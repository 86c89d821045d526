"""The embedded ledger's fast path (issue 17): operations that run at once on the caller's
thread when nothing is queued still apply in the order they were started; a settle the
gateway does not wait for is seen by everything asked afterwards and is never lost at
shutdown; checkpoints run beside the writers and keep the write-ahead log short."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway.budgets import EmbeddedLedger, Limit
from gateway.budgets.embedded import SETTLE_WAIT_S
from gateway.budgets.guard import Admission, BudgetGuard
from gateway.energy import Calibration
from gateway.metrics import Metrics

pytestmark = pytest.mark.unit

NOW = 1_800_000_030.0
WINDOW = [Limit("1d", 15.0)]


def test_an_operation_started_after_a_queued_one_never_overtakes_it(tmp_path):
    """The first reservation waits in the worker's queue for a lock held elsewhere; the lock
    is released and a second one starts at once: the second must still come second (only
    one of the two fits the 15 J window, and it is the first)."""
    path = tmp_path / "ledger.sqlite"

    async def body() -> None:
        ledger = EmbeddedLedger(path, busy_timeout_ms=2000)
        try:
            assert (await ledger.reserve("acme", "warm", 1.0, WINDOW, 60, now=NOW)).ok
            assert await ledger.release("acme", "warm")
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            first = asyncio.ensure_future(ledger.reserve("acme", "a", 10.0, WINDOW, 60, now=NOW))
            await asyncio.sleep(0.05)  # queued, waiting for the lock
            other.execute("COMMIT")
            other.close()
            second = await ledger.reserve("acme", "b", 10.0, WINDOW, 60, now=NOW)
            assert (await first).ok
            assert not second.ok
        finally:
            await ledger.close()

    asyncio.run(body())


def test_a_settle_not_waited_for_is_seen_by_what_follows_and_survives_close(tmp_path):
    path = tmp_path / "ledger.sqlite"
    limits = [Limit("1d", 1000.0)]

    async def body() -> None:
        ledger = EmbeddedLedger(path)
        guard = BudgetGuard(ledger, 60, False, Metrics(), Calibration())
        reserved = await ledger.reserve("acme", "r1", 40.0, limits, 60, now=NOW)
        admission = Admission(16, reserved)
        await guard.settle(None, "acme", "r1", admission, 12.5, wait=False)  # type: ignore[arg-type]
        [state] = await ledger.status("acme", limits, now=NOW)
        assert (state.spent, state.reserved) == (12.5, 0.0)

        reserved = await ledger.reserve("acme", "r2", 40.0, limits, 60, now=NOW)
        await guard.settle(None, "acme", "r2", Admission(16, reserved), 7.25,  # type: ignore[arg-type]
                           wait=False)
        await guard.close()  # waits for the settle in flight, then closes the ledger

        reopened = EmbeddedLedger(path)
        try:
            [state] = await reopened.status("acme", limits, now=NOW)
            assert (state.spent, state.reserved) == (19.75, 0.0)
            assert not await reopened.settle("acme", "r2", 7.25)  # settled exactly once
        finally:
            await reopened.close()

    asyncio.run(body())


def test_settles_handed_over_wait_for_the_caller_to_yield_and_go_before_what_follows(tmp_path):
    """settle_soon writes nothing while the request that handed it over is still running
    (its answer is written first); the settles handed over meanwhile are then applied
    together, before anything asked of the ledger afterwards, or on their own once
    SETTLE_WAIT_S has passed with nothing asked; close applies any left."""
    path = tmp_path / "ledger.sqlite"
    limits = [Limit("1d", 1000.0)]

    def active() -> int:
        db = sqlite3.connect(path)
        try:
            return db.execute("SELECT COUNT(*) FROM reservations WHERE state='active'").fetchone()[0]
        finally:
            db.close()

    async def body() -> None:
        ledger = EmbeddedLedger(path)
        for rid in ("a", "b", "c"):
            assert (await ledger.reserve("acme", rid, 10.0, limits, 60, now=NOW)).ok
        handed = [ledger.settle_soon("acme", rid, 3.0) for rid in ("a", "b", "c")]
        assert active() == 3  # not yet: the caller has not yielded
        [state] = await ledger.status("acme", limits, now=NOW)  # started after them
        assert (state.spent, state.reserved) == (9.0, 0.0)
        assert [await f for f in handed] == [True, True, True]
        assert active() == 0

        again = ledger.settle_soon("acme", "a", 3.0)
        await asyncio.sleep(SETTLE_WAIT_S / 5)
        assert not again.done()  # waiting for company
        await asyncio.sleep(SETTLE_WAIT_S * 4)  # applied on its own, nothing asked after it
        assert again.done() and again.result() is False  # settled once only

        assert (await ledger.reserve("acme", "d", 10.0, limits, 60, now=NOW)).ok
        last = ledger.settle_soon("acme", "d", 1.0)
        await ledger.close()
        assert await last
        reopened = EmbeddedLedger(path)
        try:
            [state] = await reopened.status("acme", limits, now=NOW)
            assert (state.spent, state.reserved) == (10.0, 0.0)
        finally:
            await reopened.close()

    asyncio.run(body())


def _commits(ledger: EmbeddedLedger) -> list[str]:
    """Transactions the ledger's connection begins from now on (its statement trace)."""
    begun: list[str] = []
    assert ledger._db is not None  # opened by an operation already
    ledger._db.set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE"
                                  else None)
    return begun


def test_a_settle_handed_over_shares_the_next_reservations_commit(tmp_path):
    """Group commit: the next request's reservation applies the settle first, in its own
    transaction; one commit per request instead of two."""
    limits = [Limit("1d", 1000.0)]

    async def body() -> None:
        ledger = EmbeddedLedger(tmp_path / "ledger.sqlite")
        try:
            assert (await ledger.reserve("acme", "r1", 10.0, limits, 60, now=NOW)).ok
            begun = _commits(ledger)
            settled = ledger.settle_soon("acme", "r1", 4.0)
            reserved = await ledger.reserve("acme", "r2", 10.0, limits, 60, now=NOW)
            assert reserved.ok and await settled
            assert begun == ["BEGIN IMMEDIATE"]
            [window] = reserved.windows
            assert (window.spent, window.reserved) == (4.0, 10.0)  # the settle went first
        finally:
            await ledger.close()

    asyncio.run(body())


def test_a_settle_sharing_a_transaction_is_kept_when_the_operation_fails(tmp_path):
    """The operation runs inside a savepoint: a short reservation (rolled back to take the
    full path) and a refused duplicate id undo only what they did, never the settle
    applied before them."""
    limits = [Limit("1d", 20.0)]

    async def body() -> None:
        ledger = EmbeddedLedger(tmp_path / "ledger.sqlite")
        try:
            assert (await ledger.reserve("acme", "r1", 15.0, limits, 60, now=NOW)).ok
            settled = ledger.settle_soon("acme", "r1", 15.0)
            with pytest.raises(ValueError, match="already has a reservation"):
                await ledger.reserve("acme", "r1", 1.0, limits, 60, now=NOW)
            assert await settled

            assert (await ledger.reserve("acme", "r2", 4.0, limits, 60, now=NOW)).ok
            settled = ledger.settle_soon("acme", "r2", 4.0)
            short = await ledger.reserve("acme", "r3", 2.0, limits, 60, now=NOW)
            assert not short.ok and await settled
            [state] = await ledger.status("acme", limits, now=NOW)
            assert (state.spent, state.reserved) == (19.0, 0.0)
            assert not await ledger.release("acme", "r3")  # the short one left no hold
        finally:
            await ledger.close()

    asyncio.run(body())


def test_a_sweep_in_the_worker_thread_carries_the_settles_handed_over_before_it(tmp_path):
    """expire() always runs in the worker thread (a sweep may be long); the settles handed
    over before it still go first, in its transaction, and learn their results from it."""
    limits = [Limit("1d", 100.0)]

    async def body() -> None:
        ledger = EmbeddedLedger(tmp_path / "ledger.sqlite")
        try:
            assert (await ledger.reserve("acme", "kept", 10.0, limits, 60, now=NOW)).ok
            assert (await ledger.reserve("acme", "stale", 10.0, limits, 1, now=NOW)).ok
            settled = ledger.settle_soon("acme", "kept", 6.0)
            assert await ledger.expire(now=NOW + 30) == 1
            assert settled.done() and settled.result() is True
            [state] = await ledger.status("acme", limits, now=NOW + 30)
            assert (state.spent, state.reserved) == (6.0, 0.0)
        finally:
            await ledger.close()

    asyncio.run(body())


def _spent_in_the_database_file(path) -> float:
    """Spent joules as the database file alone holds them (the write-ahead log unread)."""
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return float(db.execute("SELECT COALESCE(SUM(spent), 0) FROM buckets").fetchone()[0])
    except sqlite3.OperationalError:  # no table in the file yet
        return 0.0
    finally:
        db.close()


def test_maintain_checkpoints_the_log_into_the_database_file(tmp_path):
    path = tmp_path / "ledger.sqlite"
    limits = [Limit("1d", 1e9)]

    async def body() -> None:
        ledger = EmbeddedLedger(path)
        try:
            for i in range(100):
                assert (await ledger.reserve("acme", f"r{i}", 1.0, limits, 60, now=NOW)).ok
                assert await ledger.settle("acme", f"r{i}", 0.5)
            assert _spent_in_the_database_file(path) < 50.0  # no commit checkpointed
            await ledger.maintain()
            assert _spent_in_the_database_file(path) == pytest.approx(50.0)
            [state] = await ledger.status("acme", limits, now=NOW)
            assert state.spent == pytest.approx(50.0) and state.reserved == 0
        finally:
            await ledger.close()

    asyncio.run(body())


def test_an_sqlite_without_returning_is_refused_at_start_with_what_to_do(tmp_path, monkeypatch):
    """The request path uses UPDATE ... RETURNING (SQLite 3.35): an older SQLite (Ubuntu
    20.04's 3.31, RHEL 8's 3.26) must fail at start, naming the fix, not refuse every
    budgeted request later."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(RuntimeError, match=r"SQLite 3\.35\.0 or newer.*3\.31\.1.*redis"):
        EmbeddedLedger(tmp_path / "ledger.sqlite")
