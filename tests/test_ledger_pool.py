"""A worker's pool of reserved joules in the embedded ledger (``gateway/budgets/pool.py``):
made only where a window has room for many requests, held like any reservation, so spend
stays exact, budgets are never passed (one worker or two), a budget's last joules are
reserved request by request, and nothing stays reserved once the pool is released."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway.budgets import EmbeddedLedger, LedgerUnavailable, Limit
from gateway.budgets.pool import FRACTION, MOST_REQUESTS
from gateway.budgets.windows import period

pytestmark = pytest.mark.unit

NOW = 1_800_000_030.0
BIG = [Limit("1d", 1_000_000.0)]


def run(body, tmp_path, workers: int = 1) -> None:
    async def main() -> None:
        ledgers = [EmbeddedLedger(tmp_path / "ledger.sqlite") for _ in range(workers)]
        try:
            await body(*ledgers)
        finally:
            for ledger in ledgers:
                await ledger.close()

    asyncio.run(main())


def rows(tmp_path) -> list[tuple[str, float, str]]:
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        return db.execute("SELECT request_id, joules, state FROM reservations "
                          "ORDER BY rowid").fetchall()


def bucket(tmp_path) -> tuple[float, float]:
    """(spent, reserved) of acme's 1d bucket as stored: what every worker's ledger sees."""
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        return db.execute("SELECT spent, reserved FROM buckets WHERE window='1d' AND "
                          "period_start=?", (period("1d", NOW)[0],)).fetchone()


async def drain(ledger: EmbeddedLedger) -> None:
    """Release the ledger's idle pools now (their rows go with its next operation)."""
    ledger.pool_idle_s = 0.0
    await ledger.maintain()
    await ledger.status("acme", BIG, now=NOW)


def test_a_pool_is_made_beside_a_reservation_and_requests_hold_from_it(tmp_path):
    async def body(ledger: EmbeddedLedger) -> None:
        first = await ledger.reserve("acme", "r0", 10.0, BIG, 600, now=NOW)
        assert first.ok and first.windows[0].reserved == 10.0
        pool = MOST_REQUESTS * 10.0  # 1% of ~1e6 J is more than 64 requests of 10 J
        assert bucket(tmp_path) == (0.0, 10.0 + pool)  # the pool is held in the window ...
        # ... but this worker's readings show what requests hold; another worker's show all
        assert (await ledger.status("acme", BIG, now=NOW))[0].reserved == 10.0
        other = EmbeddedLedger(tmp_path / "ledger.sqlite")
        assert (await other.status("acme", BIG, now=NOW))[0].reserved == 10.0 + pool
        await other.close()
        second = await ledger.reserve("acme", "r1", 10.0, BIG, 600, now=NOW)
        assert second.ok and second.windows[0].reserved == 20.0
        assert [r[0] for r in rows(tmp_path)] == ["r0", rows(tmp_path)[1][0]]  # no row for r1
        assert bucket(tmp_path) == (0.0, 10.0 + pool)
        assert (await ledger.status("acme", BIG, now=NOW))[0].reserved == 20.0
        assert await ledger.settle("acme", "r1", 7.5)
        assert not await ledger.settle("acme", "r1", 7.5)  # idempotent, as without a pool
        assert await ledger.release("acme", "r0")
        state = (await ledger.status("acme", BIG, now=NOW))[0]
        assert (state.spent, state.reserved) == (7.5, 0.0)
        assert bucket(tmp_path) == (7.5, pool - 10.0)  # r1's hold left the pool's row
        assert rows(tmp_path)[1][1] == pool - 10.0
        await drain(ledger)
        assert bucket(tmp_path) == (7.5, 0.0)
        assert rows(tmp_path)[1][2] == "released"

    run(body, tmp_path)


def test_no_pool_where_the_room_is_for_few_requests(tmp_path):
    async def body(ledger: EmbeddedLedger) -> None:
        limits = [Limit("1d", 5_000.0)]  # 1% of it is under 8 requests of 10 J
        for i in range(3):
            assert (await ledger.reserve("acme", f"r{i}", 10.0, limits, 600, now=NOW)).ok
        assert (await ledger.status("acme", limits, now=NOW))[0].reserved == 30.0
        assert [r[0] for r in rows(tmp_path)] == ["r0", "r1", "r2"]

    run(body, tmp_path)


def test_a_budget_is_spent_to_the_last_joule_and_never_past_it(tmp_path):
    limits = [Limit("1d", 20_000.0), Limit("1h", 15_000.0)]

    async def body(ledger: EmbeddedLedger) -> None:
        served = 0
        while (await ledger.reserve("acme", f"r{served}", 1.0, limits, 600, now=NOW)).ok:
            assert await ledger.settle("acme", f"r{served}", 1.0)
            served += 1
        assert served == 15_000  # exactly: no pool kept a joule back at the end
        pools = sum(r[0].startswith("pool:") for r in rows(tmp_path))
        assert pools and len(rows(tmp_path)) < served / 10  # most were held from pools
        await drain(ledger)
        states = await ledger.status("acme", limits, now=NOW)
        assert [(s.spent, s.reserved) for s in states] == [(15_000.0, 0.0), (15_000.0, 0.0)]
        assert bucket(tmp_path) == (15_000.0, 0.0)

    run(body, tmp_path)


def test_no_pool_for_a_window_counted_in_another_unit(tmp_path):
    # Its factor (joule-equivalents per joule) changes with the grid; held request by request.
    limits = [Limit("1d", 1e9), Limit("1h", 1e9, factor=0.5, unit="co2_g")]

    async def body(ledger: EmbeddedLedger) -> None:
        for i in range(3):
            assert (await ledger.reserve("acme", f"r{i}", 10.0, limits, 600, now=NOW)).ok
        assert [r[0] for r in rows(tmp_path)] == ["r0", "r1", "r2"]

    run(body, tmp_path)


def test_two_workers_with_pools_hold_no_more_than_the_budget(tmp_path):
    limits = [Limit("1d", 50_000.0)]

    async def body(a: EmbeddedLedger, b: EmbeddedLedger) -> None:
        held = 0.0
        for i in range(12_000):  # never settled: every hold stays in flight
            worker = a if i % 3 else b
            if (await worker.reserve("acme", f"r{i}", 5.0, limits, 600, now=NOW)).ok:
                held += 5.0
        assert held <= 50_000.0
        state = (await a.status("acme", limits, now=NOW))[0]
        assert state.reserved <= 50_000.0 and state.remaining >= 0
        assert held >= 50_000.0 * (1 - 2 * FRACTION)  # pools kept back at most their size

    run(body, tmp_path, workers=2)


def test_a_pool_stops_at_its_periods_end_and_a_dead_workers_pool_expires(tmp_path):
    async def body(ledger: EmbeddedLedger) -> None:
        assert (await ledger.reserve("acme", "r0", 10.0, BIG, 600, now=NOW)).ok
        assert (await ledger.reserve("acme", "r1", 10.0, BIG, 600, now=NOW)).ok
        end = period("1d", NOW)[1]
        later = await ledger.reserve("acme", "r2", 10.0, BIG, 600, now=end + 1)
        assert later.ok and later.windows[0].period_start == end  # the new day's bucket
        assert later.windows[0].reserved == 10.0
        # The old pool (r1 still holds from it) stays until r1 is done; were this worker to
        # die, its row would expire like any reservation's (r2's reservation, a day later,
        # already returned the old day's expired holds).
        await ledger.expire(now=NOW + 601)
        assert [state for _, _, state in rows(tmp_path)] == [
            "expired", "expired", "active", "active"]  # r0, the old pool, r2, a new pool
        old = (await ledger.status("acme", BIG, now=NOW))[0]
        assert old.reserved == 0.0
        assert await ledger.settle("acme", "r1", 4.0)  # a late settle still spends
        assert (await ledger.status("acme", BIG, now=NOW))[0].spent == 4.0

    run(body, tmp_path)


def test_pooled_requests_are_served_while_the_file_is_locked_and_spend_later(tmp_path):
    async def body(ledger: EmbeddedLedger) -> None:
        assert (await ledger.reserve("acme", "r0", 10.0, BIG, 600, now=NOW)).ok
        other = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            # Their joules are reserved already (in the pool): served without the file.
            for i in range(1, 6):
                assert (await ledger.reserve("acme", f"r{i}", 10.0, BIG, 600, now=NOW)).ok
            with pytest.raises(LedgerUnavailable, match="locked"):
                await ledger.settle("acme", "r1", 3.0)  # the guard queues it and retries
        finally:
            other.execute("COMMIT")
            other.close()
        for i in range(1, 6):
            assert await ledger.settle("acme", f"r{i}", 3.0)
        assert await ledger.settle("acme", "r0", 3.0)
        await drain(ledger)
        state = (await ledger.status("acme", BIG, now=NOW))[0]
        assert (state.spent, state.reserved) == (18.0, 0.0)

    run(body, tmp_path)
