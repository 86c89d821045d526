"""The embedded ledger while someone else holds SQLite's write lock (another worker process
in a long transaction, ``joulegate budget`` on the command line): the event loop keeps
serving, and budgeted requests follow ``ledger.on_unavailable`` — 503 ``ledger_unavailable``
under ``fail_closed``, served and recorded once the lock is gone under ``fail_open`` —
never a 500 and never a stalled gateway.

The unit tests hold the lock from a second connection in this process; the e2e test runs
a real gateway process and a second process holding ``BEGIN IMMEDIATE`` on its file."""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.budgets import EmbeddedLedger, LedgerUnavailable, Limit

from .conftest import ADMIN_KEY, KEYS, priced_policy, wait_until
from .inprocess import InProcessGateway, policy
from .scripted import Script

NOW = 1_800_000_030.0
# Budgets too small for a worker's pool (gateway/budgets/pool.py): every request here goes
# to the locked file. test_pooled_holds_* is the case with a pool.
LIMITS = [Limit("1d", 5_000.0)]
HI = "Say hello in one short sentence."  # estimated at 12 prompt tokens
CONCURRENT = 50


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold the ledger file's write lock from another connection, as a second process does."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("COMMIT")
    finally:
        other.close()


# -- the ledger alone -----------------------------------------------------------------------


@pytest.mark.unit
def test_a_locked_ledger_is_unavailable_without_blocking_the_loop(tmp_path):
    async def body() -> None:
        ledger = EmbeddedLedger(tmp_path / "ledger.sqlite", busy_timeout_ms=100)
        try:
            assert (await ledger.reserve("acme", "a", 10.0, LIMITS, 60, now=NOW)).ok
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            beat = asyncio.ensure_future(ticker())
            with write_lock(tmp_path / "ledger.sqlite"):
                await asyncio.sleep(0)
                before = ticks
                with pytest.raises(LedgerUnavailable, match="locked by another process"):
                    await ledger.reserve("acme", "b", 10.0, LIMITS, 60, now=NOW)
                # The loop ran other work while the ledger waited for the lock.
                assert ticks > before + 1
                # Queued behind a locked file, every operation answers (none hangs).
                results = await asyncio.gather(
                    *(ledger.settle("acme", "a", 5.0) for _ in range(5)),
                    return_exceptions=True)
                assert all(isinstance(r, LedgerUnavailable) for r in results)
            beat.cancel()
            # The lock is gone: the same ledger works again, nothing was half-written.
            assert await ledger.settle("acme", "a", 5.0)
            state = (await ledger.status("acme", LIMITS, now=NOW))[0]
            assert (state.spent, state.reserved) == (5.0, 0.0)
            with pytest.raises(ValueError, match="already has a reservation"):
                await ledger.reserve("acme", "a", 1.0, LIMITS, 60, now=NOW)  # not a 503 either
        finally:
            await ledger.close()

    asyncio.run(body())


@pytest.mark.unit
def test_a_broken_ledger_file_is_unavailable_and_recovers(tmp_path):
    path = tmp_path / "ledger.sqlite"

    async def body() -> None:
        path.write_bytes(b"this is not a database" * 100)
        ledger = EmbeddedLedger(path)
        try:
            with pytest.raises(LedgerUnavailable, match="failed"):
                await ledger.status("acme", LIMITS, now=NOW)
            path.unlink()  # an operator moved the broken file away: the next call reopens
            assert [s.spent for s in await ledger.status("acme", LIMITS, now=NOW)] == [0.0]
        finally:
            await ledger.close()

    asyncio.run(body())


# -- the gateway in-process -------------------------------------------------------------------


async def contended(gw: InProcessGateway, ledger_path: Path
                    ) -> tuple[list[httpx.Response], list[str], list[float]]:
    """With the ledger's write lock held elsewhere: CONCURRENT budgeted requests, and
    /healthz probed one after another while they run. Returns the responses, the order in
    which things completed, and each probe's latency."""
    order: list[str] = []

    async def ask() -> httpx.Response:
        r = await gw.chat(model="big", content=HI, max_tokens=12)
        order.append("budgeted")
        return r

    latencies: list[float] = []
    with write_lock(ledger_path):
        requests = [asyncio.ensure_future(ask()) for _ in range(CONCURRENT)]
        await asyncio.sleep(0.05)  # let them reach the ledger
        while not all(r.done() for r in requests):
            t0 = time.perf_counter()
            probe = await gw.http.get("/healthz")
            latencies.append(time.perf_counter() - t0)
            assert probe.status_code == 200
            order.append("healthz")
            await asyncio.sleep(0.01)
        responses = await asyncio.gather(*requests)
        order.append("released")
    return responses, order, latencies


@pytest.mark.unit
@pytest.mark.anyio
async def test_in_process_fail_closed_under_a_held_lock(tmp_path):
    p = policy({"budgets": [{"window": "1d", "joules": 30_000}]},
               ledger={"on_unavailable": "fail_closed", "busy_timeout_ms": 200})
    twelve = Script(tokens=["tok"] * 12, prompt_tokens=12)
    async with InProcessGateway(tmp_path, p, {"up-big": twelve}) as gw:
        assert (await gw.chat(model="big", content=HI, max_tokens=12)).status_code == 200
        # Its settle is applied after the answer, before anything asked of the ledger later:
        # this asks, so the lock below catches only the requests that follow.
        assert (await gw.budget())["1d"]["spent_joules"] == 48.0
        ledger_path = tmp_path / "state" / "ledger.sqlite"
        responses, order, latencies = await contended(gw, ledger_path)
        assert order[0] == "healthz", order  # the loop answered while requests waited
        assert order.count("healthz") >= 1 and order[-1] == "released"
        assert [r.status_code for r in responses] == [503] * CONCURRENT
        for r in responses:
            assert r.json()["error"]["code"] == "ledger_unavailable"
            assert r.headers["retry-after"] == "5"
        assert len(gw.backends["up-big"].requests) == 1  # only the first, before the lock
        assert await gw.metric("joulegate_budget_rejections_total", tenant="acme",
                               reason="ledger_down") == CONCURRENT
        window = (await gw.budget())["1d"]  # the lock is gone: the ledger answers again
        assert window["reserved_joules"] == 0 and window["spent_joules"] == 48.0
        print(f"\n/healthz under contention (in-process): {len(latencies)} probes, "
              f"median {statistics.median(latencies) * 1000:.2f} ms, "
              f"max {max(latencies) * 1000:.2f} ms")


@pytest.mark.unit
@pytest.mark.anyio
async def test_in_process_fail_open_serves_and_records_each_request_once(tmp_path):
    p = policy({"budgets": [{"window": "1d", "joules": 30_000}]},
               ledger={"on_unavailable": "fail_open", "busy_timeout_ms": 200})
    twelve = Script(tokens=["tok"] * 12, prompt_tokens=12)
    async with InProcessGateway(tmp_path, p, {"up-big": twelve}) as gw:
        first = await gw.chat(model="big", content=HI, max_tokens=12)
        assert first.status_code == 200
        ledger_path = tmp_path / "state" / "ledger.sqlite"
        responses, order, _ = await contended(gw, ledger_path)
        assert order[0] == "healthz", order
        assert [r.status_code for r in responses] == [200] * CONCURRENT
        served = sum(r.json()["usage"]["energy_joules"] for r in responses)
        assert served == CONCURRENT * 48.0
        # Spend made while the ledger was locked is recorded once the lock is gone
        # (the guard's reconcile loop retries it), each request exactly once.
        expected = served + first.json()["usage"]["energy_joules"]
        for _ in range(300):
            window = (await gw.budget())["1d"]
            if window["spent_joules"] == pytest.approx(expected):
                break
            await asyncio.sleep(0.1)
        assert window["spent_joules"] == pytest.approx(expected)
        assert window["reserved_joules"] == 0
        await asyncio.sleep(1.5)  # another reconcile pass records nothing twice
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(expected)


# -- a real gateway and a second process ----------------------------------------------------

_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("LOCKED", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
print("RELEASED", flush=True)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
def test_second_process_holding_the_write_lock(mode, upstream, gateways):
    p = priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": 30_000}]},
                      {"on_unavailable": mode, "busy_timeout_ms": 300})
    gw = gateways(p)
    auth = {"authorization": f"Bearer {KEYS['acme']}"}
    body = {"model": "big", "max_tokens": 12, "messages": [{"role": "user", "content": HI}]}
    warm = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth, timeout=30)
    assert warm.status_code == 200  # the ledger file exists, the gateway's connection is open
    ledger_path = Path(p["state_dir"]) / "ledger.sqlite"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ledger_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "LOCKED"

        async def run() -> tuple[list[httpx.Response], list[str], list[float]]:
            order: list[str] = []
            latencies: list[float] = []
            limits = httpx.Limits(max_connections=CONCURRENT + 5)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
                async def ask() -> httpx.Response:
                    r = await client.post("/v1/chat/completions", json=body, headers=auth)
                    order.append("budgeted")
                    return r

                requests = [asyncio.ensure_future(ask()) for _ in range(CONCURRENT)]
                await asyncio.sleep(0.1)  # let them reach the gateway's ledger
                while not all(r.done() for r in requests):
                    t0 = time.perf_counter()
                    probe = await client.get("/healthz")
                    latencies.append(time.perf_counter() - t0)
                    assert probe.status_code == 200
                    order.append("healthz")
                    await asyncio.sleep(0.01)
                return list(await asyncio.gather(*requests)), order, latencies

        responses, order, latencies = asyncio.run(run())
        assert holder.poll() is None  # the lock was held the whole time ...
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "RELEASED"  # ... and released only now
        assert order[0] == "healthz", order  # answered before any budgeted request finished
        print(f"\n/healthz under contention ({mode}, separate processes): {len(latencies)} "
              f"probes, median {statistics.median(latencies) * 1000:.2f} ms, "
              f"max {max(latencies) * 1000:.2f} ms")
        statuses = [r.status_code for r in responses]
        assert 500 not in statuses
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}

        def spent() -> float:
            r = httpx.get(f"{gw.url}/admin/tenants/acme/budget", headers=admin, timeout=30)
            assert r.status_code == 200, r.text
            return float(r.json()["windows"][0]["spent_joules"])

        warm_j = warm.json()["usage"]["energy_joules"]
        if mode == "fail_closed":
            assert statuses == [503] * CONCURRENT
            assert {r.json()["error"]["code"] for r in responses} == {"ledger_unavailable"}
            assert all(r.headers.get("retry-after") for r in responses)
            assert spent() == pytest.approx(warm_j)
        else:
            assert statuses == [200] * CONCURRENT
            total = warm_j + sum(r.json()["usage"]["energy_joules"] for r in responses)
            wait_until(lambda: spent() == pytest.approx(total), 30, 0.2,
                       "fail-open spend to be recorded after the lock was released")
            time.sleep(1.5)  # a later reconcile pass records nothing twice
            assert spent() == pytest.approx(total)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
