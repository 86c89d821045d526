"""Supervised background loops: a loop that fails is logged, counted and restarted after a
backoff; closing is clean whatever the loop is doing. The budget guard's reconcile loop,
killed by a ledger that fails under it, comes back and returns expired reservations."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.budgets import (
    EmbeddedLedger,
    Ledger,
    LedgerUnavailable,
    Limit,
    Reservation,
    WindowState,
)
from gateway.budgets.guard import BudgetGuard
from gateway.energy import Calibration
from gateway.metrics import Metrics
from gateway.supervise import Backoff, Supervisor, supervise
from policies import parse_policy

from .inprocess import policy

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

FAST = Backoff(first_s=0.001, max_s=0.004, healthy_after_s=3600)
#: Long enough that a test sees the supervisor waiting in it.
FOREVER = Backoff(first_s=3600, max_s=3600)


def restarts(metrics: Metrics, task: str) -> float:
    value = metrics.registry.get_sample_value("joulegate_background_task_restarts_total",
                                              {"task": task})
    assert value is not None, f"no restart counter for {task}"
    return value


async def until(predicate, what: str, turns: int = 20_000) -> None:
    """Let the loop run until ``predicate()`` holds (a bounded number of short sleeps)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


async def test_a_failing_loop_is_logged_counted_and_restarted(caplog):
    metrics = Metrics()
    runs: list[int] = []
    steady = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) <= 3:
            raise RuntimeError(f"boom {len(runs)}")
        steady.set()
        await asyncio.Event().wait()  # a healthy loop runs until cancelled

    sup = supervise("demo", loop, metrics, FAST)
    assert restarts(metrics, "demo") == 0  # exported at zero before any failure
    await asyncio.wait_for(steady.wait(), 30)
    assert sup.crashes == 3 and sup.restarts == 3 and sup.state == "running"
    assert restarts(metrics, "demo") == 3
    failures = [r for r in caplog.records if "background task demo failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)  # with the traceback
    assert "boom 1" in caplog.text
    await sup.close()
    assert sup.state == "closed" and not sup.running


async def test_a_loop_that_returns_is_done_not_restarted():
    metrics = Metrics()
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    sup = supervise("once", once, metrics, FAST)
    await until(lambda: sup.state == "done", "the loop to finish")
    await asyncio.sleep(0.01)
    assert calls == 1 and restarts(metrics, "once") == 0
    await sup.close()


async def test_close_mid_iteration_cancels_the_loop_itself():
    entered, unwound = asyncio.Event(), asyncio.Event()

    async def loop() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwound.set()

    sup = supervise("busy", loop, Metrics(), FAST)
    await asyncio.wait_for(entered.wait(), 30)
    await sup.close()
    assert unwound.is_set()  # the loop's cleanup ran before close() returned
    assert sup.state == "closed" and not sup.running


async def test_close_while_waiting_to_restart_is_clean():
    metrics = Metrics()

    async def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    sup = supervise("broken", broken, metrics, FOREVER)
    await until(lambda: sup.state == "backoff", "the supervisor to wait before a restart")
    assert sup.crashes == 1
    await sup.close()  # cancels the backoff sleep; nothing is left pending or unretrieved
    assert not sup.running and sup.restarts == 0 and restarts(metrics, "broken") == 0
    await sup.close()  # twice is fine


async def test_close_before_start_and_sync_cancel():
    await Supervisor("never", lambda: asyncio.sleep(0)).close()
    sup = supervise("cancelled", lambda: asyncio.Event().wait())
    await asyncio.sleep(0)
    sup.cancel()  # the synchronous half: the task ends at the next turn of the loop
    await until(lambda: not sup.running, "the cancelled task to end")
    await sup.close()


def test_backoff_doubles_up_to_its_maximum():
    b = Backoff(first_s=0.5, max_s=3.0)
    delays = [b.first_s]
    for _ in range(4):
        delays.append(b.next(delays[-1]))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


# -- the budget guard's reconcile loop ------------------------------------------------------


class FailingStatusLedger(Ledger):
    """The embedded ledger, except that its first ``failures`` ``status``/``expire`` calls
    raise what a broken SQLite file raises (not LedgerUnavailable, which the reconcile loop
    expects and rides out): a test double at the ledger interface."""

    def __init__(self, inner: EmbeddedLedger, failures: int):
        self.inner, self.failures, self.failed = inner, failures, 0

    def _maybe_fail(self) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error (injected)")

    async def reserve(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                      ttl_s: float, now: float | None = None) -> Reservation:
        return await self.inner.reserve(tenant, request_id, joules, limits, ttl_s, now)

    async def settle(self, tenant: str, request_id: str, joules: float) -> bool:
        return await self.inner.settle(tenant, request_id, joules)

    async def release(self, tenant: str, request_id: str) -> bool:
        return await self.inner.release(tenant, request_id)

    async def record(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                     now: float) -> bool:
        return await self.inner.record(tenant, request_id, joules, limits, now)

    async def status(self, tenant: str, limits: list[Limit],
                     now: float | None = None) -> list[WindowState]:
        self._maybe_fail()
        return await self.inner.status(tenant, limits, now)

    async def grant(self, tenant: str, window: str, joules: float, now: float | None = None) -> None:
        await self.inner.grant(tenant, window, joules, now)

    async def reset(self, tenant: str, windows: list[str], now: float | None = None) -> None:
        await self.inner.reset(tenant, windows, now)

    async def expire(self, now: float | None = None) -> int:
        self._maybe_fail()
        return await self.inner.expire(now)

    async def close(self) -> None:
        await self.inner.close()


def guard_for(tmp_path: Path, failures: int, backoff: Backoff) -> tuple[BudgetGuard, Metrics,
                                                                       FailingStatusLedger]:
    metrics = Metrics()
    ledger = FailingStatusLedger(EmbeddedLedger(tmp_path / "ledger.sqlite"), failures)
    guard = BudgetGuard(ledger, ttl_s=600, fail_open=False, metrics=metrics,
                        calibration=Calibration(), reconcile_every_s=0.005,
                        expire_every_s=0.02, backoff=backoff)
    guard.watch(parse_policy(policy({"budgets": [{"window": "1d", "joules": 1000}]})))
    return guard, metrics, ledger


async def test_reconcile_killed_by_the_ledger_restarts_and_releases_expired_reservations(
        tmp_path):
    guard, metrics, ledger = guard_for(tmp_path, failures=3, backoff=FAST)
    limits = [Limit("1d", 1000)]
    # A reservation whose gateway never came back: its TTL has already passed.
    lost = await ledger.inner.reserve("acme", "lost", 400.0, limits, ttl_s=0.001)
    assert lost.ok and lost.windows[0].reserved == 400.0
    guard.start()
    try:
        await until(lambda: guard.remaining_fraction("acme") == 1.0,
                    "the reconcile loop to return the expired reservation")
        assert ledger.failed == 3  # every injected failure was met ...
        assert guard.reconciler is not None and guard.reconciler.crashes == 3
        assert restarts(metrics, "budget_reconcile") == 3  # ... and survived
        state = (await ledger.inner.status("acme", limits))[0]
        assert (state.reserved, state.spent, state.remaining) == (0.0, 0.0, 1000.0)
        assert metrics.registry.get_sample_value(
            "joulegate_budget_reserved_joules", {"tenant": "acme"}) == 0.0
    finally:
        await guard.close()


async def test_guard_closes_cleanly_while_its_reconcile_loop_waits_to_restart(tmp_path):
    guard, metrics, ledger = guard_for(tmp_path, failures=1, backoff=FOREVER)
    guard.start()
    assert guard.reconciler is not None
    await until(lambda: guard.reconciler.state == "backoff", "the reconcile loop to fail")
    await guard.close()  # no pending task, no unretrieved exception, the ledger closed
    assert not guard.reconciler.running and restarts(metrics, "budget_reconcile") == 0
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.inner.status("acme", [Limit("1d", 1000)])
