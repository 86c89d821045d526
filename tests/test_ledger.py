"""The budget ledger's behaviour, the same for the embedded SQLite ledger and real Redis."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from gateway.budgets import EmbeddedLedger, LedgerUnavailable, Limit, period
from gateway.budgets.redis_ledger import RedisLedger

from .conftest import free_port, wait_until

# Marked test by test: the redis ledger runs against a real redis-server (e2e).

NOW = 1_800_000_030.0  # 30 s into a minute, well inside its hour, day, ...
LIMITS = [Limit("1m", 100.0), Limit("1h", 250.0)]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: ./scripts/test installs it with apt-get")
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ping() -> bool:
        return subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                              text=True, check=False).stdout.strip() == "PONG"

    wait_until(ping, 20, 0.05, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


class Ledgers:
    """Makes ledgers of one kind (reopening the same store, like a restart) and runs a test
    body in one event loop, closing every ledger it made in that loop."""

    def __init__(self, kind: str, tmp_path, redis_url: str | None):
        self.kind, self.tmp_path, self.redis_url = kind, tmp_path, redis_url
        self.made: list = []

    def new(self):
        ledger = (EmbeddedLedger(self.tmp_path / "ledger.sqlite") if self.kind == "embedded"
                  else RedisLedger(self.redis_url))
        self.made.append(ledger)
        return ledger

    def run(self, body) -> None:
        async def wrapped():
            try:
                await body()
            finally:
                for ledger in self.made:
                    await ledger.close()

        asyncio.run(wrapped())


@pytest.fixture(params=[pytest.param("embedded", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.e2e)])
def ledgers(request, tmp_path):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    yield Ledgers(request.param, tmp_path, url)
    if url:  # a clean database for the next test
        subprocess.run(["redis-cli", "-p", url.rsplit(":", 1)[1].split("/")[0], "flushall"],
                       capture_output=True, check=False)


def test_reserve_settle_and_idempotency(ledgers):
    async def body():
        ledger = ledgers.new()
        r = await ledger.reserve("acme", "r1", 40.0, LIMITS, ttl_s=60, now=NOW)
        assert r.ok and [w.reserved for w in r.windows] == [40.0, 40.0]
        assert await ledger.settle("acme", "r1", 31.5)
        assert not await ledger.settle("acme", "r1", 31.5)  # idempotent: counted once
        assert not await ledger.settle("globex", "r2", 5.0)  # unknown request
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert [(s.spent, s.reserved) for s in states] == [(31.5, 0.0), (31.5, 0.0)]
        assert states[0].remaining == pytest.approx(68.5)

    ledgers.run(body)


def test_refusal_names_the_short_window_and_when_it_frees(ledgers):
    async def body():
        ledger = ledgers.new()
        assert (await ledger.reserve("acme", "a", 90.0, LIMITS, 60, now=NOW)).ok
        refused = await ledger.reserve("acme", "b", 20.0, LIMITS, 60, now=NOW)
        assert not refused.ok and refused.short.window == "1m"
        assert refused.short.remaining == pytest.approx(10.0)
        assert refused.retry_after_s(NOW) == pytest.approx(period("1m", NOW)[1] - NOW)
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert [s.reserved for s in states] == [90.0, 90.0]  # a refusal charges nothing
        with pytest.raises(ValueError, match="already has a reservation"):
            await ledger.reserve("acme", "a", 1.0, LIMITS, 60, now=NOW)
        # each new minute has room again, but the hour keeps what was spent in it
        assert await ledger.settle("acme", "a", 90.0)
        ok = await ledger.reserve("acme", "c", 100.0, LIMITS, 60, now=NOW + 60)
        assert ok.ok and ok.windows[1].spent == 90.0
        assert await ledger.settle("acme", "c", 100.0)
        too_much = await ledger.reserve("acme", "d", 80.0, LIMITS, 60, now=NOW + 120)
        assert not too_much.ok and too_much.short.window == "1h"  # 250 - 190 = 60 left
        assert too_much.short.remaining == pytest.approx(60.0)

    ledgers.run(body)


def test_an_expired_hold_is_handed_back_when_a_reservation_needs_its_room(ledgers):
    """The room a crashed request held comes back as soon as a reservation needs it (the
    embedded ledger's one-statement charge finds the window short and takes the full
    path, which returns expired holds first), and a charge short in the second window
    leaves the first one as it was."""
    async def body():
        ledger = ledgers.new()
        assert (await ledger.reserve("acme", "lost", 70.0, LIMITS, ttl_s=10, now=NOW)).ok
        assert (await ledger.reserve("acme", "ok", 20.0, LIMITS, ttl_s=60, now=NOW + 1)).ok
        retaken = await ledger.reserve("acme", "next", 60.0, LIMITS, ttl_s=60, now=NOW + 11)
        assert retaken.ok and [w.reserved for w in retaken.windows] == [80.0, 80.0]
        assert await ledger.settle("acme", "ok", 20.0)
        assert await ledger.settle("acme", "next", 60.0)
        assert (await ledger.reserve("acme", "more", 100.0, LIMITS, 60, now=NOW + 60)).ok
        assert await ledger.settle("acme", "more", 100.0)
        # a new minute has all its 100 J; the hour has 250 - 180 = 70 left: 80 J is refused
        # and changes nothing in the minute it would have fitted
        refused = await ledger.reserve("acme", "big", 80.0, LIMITS, 60, now=NOW + 120)
        assert not refused.ok and refused.short.window == "1h"
        states = await ledger.status("acme", LIMITS, now=NOW + 120)
        assert [(s.spent, s.reserved) for s in states] == [(0.0, 0.0), (180.0, 0.0)]
        assert (await ledger.reserve("acme", "fits", 70.0, LIMITS, 60, now=NOW + 120)).ok

    ledgers.run(body)


def test_release_returns_the_reservation(ledgers):
    async def body():
        ledger = ledgers.new()
        await ledger.reserve("acme", "r", 50.0, LIMITS, 60, now=NOW)
        assert await ledger.release("acme", "r")
        assert not await ledger.release("acme", "r")
        assert not await ledger.settle("acme", "r", 10.0)  # released: nothing spent
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert [(s.spent, s.reserved) for s in states] == [(0.0, 0.0), (0.0, 0.0)]

    ledgers.run(body)


def test_crashed_gateways_reservation_expires_and_a_late_settle_still_counts(ledgers):
    async def body():
        ledger = ledgers.new()
        await ledger.reserve("acme", "lost", 70.0, LIMITS, ttl_s=10, now=NOW)
        assert not (await ledger.reserve("acme", "x", 50.0, LIMITS, 10, now=NOW + 5)).ok
        states = await ledger.status("acme", LIMITS, now=NOW + 11)  # expired: returned
        assert [s.reserved for s in states] == [0.0, 0.0]
        assert await ledger.settle("acme", "lost", 12.0)  # the request did finish after all
        states = await ledger.status("acme", LIMITS, now=NOW + 12)
        assert [(s.spent, s.reserved) for s in states] == [(12.0, 0.0), (12.0, 0.0)]

    ledgers.run(body)


def test_expire_sweeps_every_tenant(ledgers):
    async def body():
        ledger = ledgers.new()
        await ledger.reserve("acme", "a", 10.0, LIMITS, ttl_s=5, now=NOW)
        await ledger.reserve("globex", "g", 10.0, LIMITS, ttl_s=5, now=NOW)
        await ledger.reserve("globex", "h", 10.0, LIMITS, ttl_s=500, now=NOW)
        assert await ledger.expire(now=NOW + 6) == 2
        assert [s.reserved for s in await ledger.status("globex", LIMITS, now=NOW + 6)] == [10.0, 10.0]

    ledgers.run(body)


def test_grant_and_reset(ledgers):
    async def body():
        ledger = ledgers.new()
        await ledger.reserve("acme", "a", 100.0, LIMITS, 60, now=NOW)
        await ledger.settle("acme", "a", 100.0)
        assert not (await ledger.reserve("acme", "b", 5.0, LIMITS, 60, now=NOW)).ok
        await ledger.grant("acme", "1m", 20.0, now=NOW)
        assert (await ledger.reserve("acme", "b", 5.0, LIMITS, 60, now=NOW)).ok
        await ledger.reset("acme", ["1m", "1h"], now=NOW)
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert [(s.spent, s.granted, s.reserved) for s in states] == [(0.0, 0.0, 5.0)] * 2

    ledgers.run(body)


def test_concurrent_reservations_never_overdraw(ledgers):
    async def body():
        ledger = ledgers.new()
        # 300 at once: more than a connection pool's default size (redis-py refused
        # requests beyond 100 with "Too many connections" before the pool was a blocking one).
        results = await asyncio.gather(*(ledger.reserve("acme", f"r{i}", 7.0, LIMITS, 60, now=NOW)
                                         for i in range(300)))
        granted = [r for r in results if r.ok]
        assert len(granted) == 14  # floor(100 / 7): the 1m window binds
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert states[0].reserved == pytest.approx(98.0)
        for r in granted:
            await ledger.settle("acme", r.request_id, 6.0)
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert states[0].spent == pytest.approx(84.0) and states[0].reserved == 0.0

    ledgers.run(body)


def test_spend_survives_a_restart(ledgers):
    async def body():
        first = ledgers.new()
        await first.reserve("acme", "a", 30.0, LIMITS, 60, now=NOW)
        await first.settle("acme", "a", 25.0)
        await first.reserve("acme", "b", 10.0, LIMITS, 60, now=NOW)
        await first.close()
        ledgers.made.remove(first)
        again = ledgers.new()
        states = await again.status("acme", LIMITS, now=NOW)
        assert [(s.spent, s.reserved) for s in states] == [(25.0, 10.0)] * 2
        assert await again.settle("acme", "b", 4.0)

    ledgers.run(body)


def test_record_without_reservation_is_idempotent(ledgers):
    async def body():
        ledger = ledgers.new()
        assert await ledger.record("acme", "offline-1", 30.0, LIMITS, now=NOW)
        assert not await ledger.record("acme", "offline-1", 30.0, LIMITS, now=NOW)
        states = await ledger.status("acme", LIMITS, now=NOW)
        assert [(s.spent, s.reserved) for s in states] == [(30.0, 0.0)] * 2
        assert not await ledger.settle("acme", "offline-1", 30.0)  # already counted

    ledgers.run(body)


@pytest.mark.e2e
def test_redis_down_is_reported():
    async def body():
        ledger = RedisLedger(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        try:
            with pytest.raises(LedgerUnavailable, match="redis"):
                await ledger.reserve("acme", "a", 1.0, LIMITS, 60, now=NOW)
        finally:
            await ledger.close()

    asyncio.run(body())


@pytest.mark.unit
def test_calendar_month_period():
    start, end = period("calendar-month", 1_704_067_200 + 86400 * 40)  # 2024-02-10
    assert (start, end) == (1_706_745_600, 1_709_251_200)  # Feb 1 .. Mar 1 (leap year)
    assert period("calendar-month", 1_735_689_599) == (1_733_011_200, 1_735_689_600)  # Dec 2024
    with pytest.raises(ValueError, match="unknown budget window"):
        period("2w", 0)


def test_holds_of_any_size_settled_in_any_order_leave_nothing_reserved(ledgers):
    """Predicted joules have many decimals (1.1 J/token x tokens x a unit factor); the
    ledger keeps nanojoules. Holds taken and closed in a shuffled order, some overlapping,
    must give back exactly what they took: no 1e-9 J left reserved with nothing in flight."""
    import random

    rng = random.Random(5)
    limits = [Limit("1d", 1e6), Limit("1h", 1e6, factor=0.2777777777777778)]

    async def body():
        ledger = ledgers.new()
        held: list[str] = []
        for i in range(400):
            if held and rng.random() < 0.5:
                rid = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.2:
                    await ledger.release("acme", rid)
                else:
                    await ledger.settle("acme", rid, rng.uniform(0, 50) / 3)
            joules = rng.uniform(0.01, 90) / 7
            assert (await ledger.reserve("acme", f"r{i}", joules, limits, 600, now=NOW)).ok
            held.append(f"r{i}")
        rng.shuffle(held)
        for rid in held:
            await ledger.settle("acme", rid, rng.uniform(0, 50) / 3)
        # The embedded ledger held most of these from a pool (1e6 J is room for many):
        # released once idle, it too gives back exactly what it took.
        if isinstance(ledger, EmbeddedLedger):
            ledger.pool_idle_s = 0.0
            await ledger.maintain()
        states = await ledger.status("acme", limits, now=NOW)
        assert [s.reserved for s in states] == [0.0, 0.0]

    ledgers.run(body)
