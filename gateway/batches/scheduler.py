"""Runs batches: waits for each one's cleanest start, sends its requests through the
gateway's own app (:mod:`.dispatch`), writes every result before counting the request
done (:mod:`.store`), and ends the batch with its output and error files.

A batch goes ``validating`` → ``in_progress`` (at once: its file was checked at upload)
→ waits for its scheduled start → runs → ``finalizing`` → ``completed``. Cancelled, it
goes ``cancelling`` (requests in flight finish, no new one starts) → ``cancelled``; past its
window with requests left, ``expired`` (those requests are in the error file as
``batch_expired``).

A request refused for the moment (429: the tenant's budget is spent for now; 503: the tier
is busy or down) pauses its batch: no request of it starts until the ``Retry-After`` (at
most a minute, by the batch clock), and then it is sent again, while the window lasts:
deferrable work waits rather than fails. Anything else is the request's result, in the
output file (2xx) or the error file.

At shutdown the service stops starting requests, lets those in flight finish (up to the
policy's ``server.shutdown_drain_s``) and gives its batches back; the next process to start
takes them over and runs only the requests not done. A process that dies without a
shutdown loses the requests it had in flight: they are sent again (its claim on the batch
lapses after ``batches.lease_s``); each request's ``attempts`` counts how often it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

import orjson
from starlette.types import ASGIApp

from policies.schema import BatchesSpec

from ..runtime import Runtime, state_dir
from ..supervise import Supervisor
from . import wire
from .clock import Clock, clock_from_env, from_unix, unix
from .dispatch import Answer, dispatch
from .plan import immediate_instant, line_carbon
from .store import BatchRow, BatchStore, FileRow, LineResult

log = logging.getLogger("joulegate.batches")

#: Sent again after this many seconds when a 429/503 gives no Retry-After, and at most
#: this long after one (a budget may be granted or reset before its window ends).
DEFAULT_RETRY_S = 5.0
MAX_RETRY_S = 60.0
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def line_id(batch_id: str, idx: int) -> str:
    """The id of a batch's request (its output line's ``id`` and its ``X-Request-Id``): the
    same every time it is sent, so an upstream sees a repeat as one."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{idx}"


class BatchService:
    """The Batch API's state and the loop that runs batches (one per gateway process)."""

    def __init__(self, runtime: Runtime, app: ASGIApp, clock: Clock | None = None):
        self.runtime = runtime
        self.app = app
        self.clock = clock or clock_from_env()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._store: BatchStore | None = None
        self._loop: Supervisor | None = None
        self._wake = asyncio.Event()
        #: batch id → the task running its requests in this process.
        self._workers: dict[str, asyncio.Task[None]] = {}
        #: Batches whose requests must stop starting (cancelled, expired).
        self._halted: set[str] = set()
        #: Batches paused after a request was refused for the moment → when to go on.
        self._paused: dict[str, datetime] = {}
        self._stopping = False
        #: Passes of the loop started and completed; a waiter for "the loop looked again".
        self._started = 0
        self._passes = 0
        self._passed = asyncio.Condition()

    @property
    def store(self) -> BatchStore:
        if self._store is None:
            raise RuntimeError("the batch service is not started")
        return self._store

    @property
    def spec(self) -> BatchesSpec:
        return self.runtime.current.policy.batches

    def use_clock(self, clock: Clock) -> None:
        """Live by ``clock`` from now on (tests: a :class:`~.clock.ManualClock`)."""
        self.clock = clock
        self.wake()

    def start(self) -> BatchService:
        self._store = BatchStore(state_dir(self.runtime.current.policy) / "batches.sqlite")
        self._loop = Supervisor("batch_scheduler", self._run, self.runtime.metrics,
                                self.runtime.backoff).start()
        return self

    def halt(self, batch_id: str) -> None:
        """Start no more of the batch's requests (it is being cancelled)."""
        self._halted.add(batch_id)
        self.wake()

    def wake(self) -> None:
        """Look at the batches again now (one was created or cancelled)."""
        self._wake.set()

    async def settle(self) -> None:
        """Return once the loop has looked at every batch since this call and every
        request it could start now has finished (for tests, with a manual clock)."""
        while True:
            async with self._passed:
                # A pass under way may have read the store before what the caller did.
                want = self._started + 1
                self.wake()
                await self._passed.wait_for(functools.partial(self._passed_since, want))
            busy = [t for t in self._workers.values() if not t.done()]
            if not busy:
                return
            await asyncio.wait(busy)

    def _passed_since(self, want: int) -> bool:
        return self._passes >= want

    async def close(self) -> None:
        """Stop starting requests, let those in flight finish (up to the policy's
        ``server.shutdown_drain_s``), give the batches back."""
        self._stopping = True
        if self._loop is not None:
            await self._loop.close()
        workers = [t for t in self._workers.values() if not t.done()]
        if workers:
            _, late = await asyncio.wait(
                workers, timeout=self.runtime.current.policy.server.shutdown_drain_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("batch requests still running at shutdown were stopped; they "
                            "will be sent again")
                await asyncio.wait(late)
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.call(self._store.release, self.owner)
            await asyncio.to_thread(self._store.close)
            self._store = None

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._started += 1
            spec = self.spec
            rows = await self.store.call(self.store.claim, self.owner, time.time(), spec.lease_s)
            now = self.clock.now()
            next_at: datetime | None = None
            for row in rows:
                at = await self._step(row, now)
                if at is not None and (next_at is None or at < next_at):
                    next_at = at
            await self.store.call(self.store.purge_files, unix(now))
            async with self._passed:
                self._passes += 1
                self._passed.notify_all()
            waits: list[Awaitable[Any]] = [self._wake.wait(),
                                           asyncio.sleep(min(spec.poll_interval_s,
                                                             spec.lease_s / 3))]
            if next_at is not None:
                waits.append(self.clock.sleep_until(next_at))
            await _first(waits)

    async def _step(self, row: BatchRow, now: datetime) -> datetime | None:
        """Move one batch on; the instant it next needs looking at, if any."""
        plan = row.plan
        running = row.id in self._workers and not self._workers[row.id].done()
        if row.status == "validating":
            updated = await self.store.call(self.store.update_batch, row.id, {
                "status": "in_progress", "in_progress_at": unix(now)}, ("validating",))
            if updated is None:
                return None
            row = updated
        if row.status == "finalizing":
            await self._finish(row, "completed", now)
            return None
        expires = from_unix(plan["expires_at"])
        if row.status == "cancelling" or now >= expires:
            self._halted.add(row.id)
            if not running:
                await self._finish(row, "cancelled" if row.status == "cancelling" else "expired",
                                   now)
            return None
        scheduled = from_unix(plan["scheduled_at"])
        if now < scheduled:
            return min(scheduled, expires)
        paused = self._paused.get(row.id)
        if paused is not None:
            if running or now < paused:
                return min(paused, expires)
            del self._paused[row.id]
        if not running and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._work(row),
                                                          name=f"batch {row.id}")
            self._workers[row.id] = task
            task.add_done_callback(functools.partial(self._forget, row.id))
        return expires

    def _forget(self, batch_id: str, task: asyncio.Task[None]) -> None:
        if self._workers.get(batch_id) is task:
            del self._workers[batch_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("batch %s: its runner failed", batch_id, exc_info=task.exception())
            self.wake()

    async def _finish(self, row: BatchRow, status: str, now: datetime) -> None:
        when = unix(now)
        changes: dict[str, Any] = {"status": status, f"{status}_at": when}
        if status == "completed":
            changes.setdefault("finalizing_at", row.doc.get("finalizing_at") or when)
        keep = row.plan.get("output_expires_s")
        files = [FileRow(wire.new_id("file-"), row.tenant, wire.OUTPUT_PURPOSE,
                         f"{row.id}_{kind}.jsonl", 0, when, None if keep is None else when + keep,
                         None)
                 for kind in ("output", "error")]

        def unfinished(idx: int, custom_id: str) -> dict[str, Any]:
            return wire.error_line(line_id(row.id, idx), custom_id, "batch_expired",
                                   EXPIRED_MESSAGE)

        await self.store.call(self.store.finalize, row.id, changes, files,
                              unfinished if status == "expired" else None)
        self._halted.discard(row.id)
        self._paused.pop(row.id, None)
        log.info("batch %s of tenant %s: %s", row.id, row.tenant, status)

    # -- one batch's requests ------------------------------------------------------------------

    def _stop(self, batch_id: str) -> bool:
        """Whether the batch's requests must stop starting: shutdown, cancelled or expired,
        or paused after a refusal (:meth:`_retry_after`)."""
        return self._stopping or batch_id in self._halted or batch_id in self._paused

    async def _work(self, row: BatchRow) -> None:
        if not row.plan.get("started_at"):
            row.plan["started_at"] = unix(self.clock.now())
            await self.store.call(self.store.set_plan, row.id, row.plan)
        slots = asyncio.Semaphore(self.spec.concurrency)
        running: set[asyncio.Task[None]] = set()
        after = -1
        try:
            while not self._stop(row.id):
                chunk = await self.store.call(self.store.pending_lines, row.id, after, 256)
                if not chunk:
                    break
                for idx, custom_id, body in chunk:
                    await slots.acquire()
                    if self._stop(row.id):
                        slots.release()
                        break
                    after = idx
                    task = asyncio.get_running_loop().create_task(
                        self._line(row, idx, custom_id, body))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _: slots.release())
            if running:
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()
        if self._stop(row.id):
            self.wake()  # the loop ends a halted batch, or resumes a paused one
            return
        if await self.store.call(self.store.pending_lines, row.id, -1, 1):
            return  # requests left (one was stopped): the next pass runs them
        updated = await self.store.call(self.store.update_batch, row.id, {
            "status": "finalizing", "finalizing_at": unix(self.clock.now())}, ("in_progress",))
        if updated is not None:
            await self._finish(updated, "completed", self.clock.now())
        else:
            self.wake()  # cancelled meanwhile

    async def _line(self, row: BatchRow, idx: int, custom_id: str, body: bytes) -> None:
        rid = line_id(row.id, idx)
        await self.store.call(self.store.start_line, row.id, idx)
        ran_at = self.clock.now()
        answer = await self._send(row, body, rid,
                                  immediate_instant(row.plan, ran_at).timestamp())
        wait = self._retry_after(answer, from_unix(row.plan["expires_at"]))
        if wait is not None:  # not done: the batch pauses, and sends it again after
            until = self.clock.now() + wait
            self._paused[row.id] = max(self._paused.get(row.id, until), until)
            return
        result = self._result(row, idx, custom_id, rid, answer, ran_at)
        await self.store.call(self.store.finish_line, row.id, idx, result)

    async def _send(self, row: BatchRow, body: bytes, rid: str, could_run_at: float) -> Answer:
        try:
            return await dispatch(self.app, row.tenant, row.doc["endpoint"], body, rid,
                                  could_run_at)
        except Exception:  # the app answered 500 and re-raised; the request is done
            log.exception("batch %s: request %s failed inside the gateway", row.id, rid)
            return Answer(500, {}, orjson.dumps({"error": {
                "message": "internal error; see the gateway log", "type": "api_error",
                "param": None, "code": "internal_error"}}))

    def _retry_after(self, answer: Answer, expires: datetime) -> timedelta | None:
        """How long to wait before sending a request refused for the moment, if it may be."""
        if answer.status not in (429, 503):
            return None
        try:
            seconds = float(answer.headers.get("retry-after", DEFAULT_RETRY_S))
        except ValueError:
            seconds = DEFAULT_RETRY_S
        wait = timedelta(seconds=min(max(seconds, 1.0), MAX_RETRY_S))
        return wait if self.clock.now() + wait < expires else None

    def _result(self, row: BatchRow, idx: int, custom_id: str, rid: str, answer: Answer,
                ran_at: datetime) -> LineResult:
        try:
            body: Any = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            body = {"error": {"message": answer.body.decode("utf-8", "replace")[:1000],
                              "type": "api_error", "param": None, "code": None}}
        ok = 200 <= answer.status < 300
        line = wire.output_line(rid, custom_id, answer.status,
                                answer.headers.get("x-request-id", rid), body)
        result = LineResult(ok, line)
        usage = body.get("usage") if ok and isinstance(body, dict) else None
        if isinstance(usage, dict):
            result.prompt_tokens = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
            result.completion_tokens = _int(usage.get("completion_tokens",
                                                      usage.get("output_tokens")))
            joules = usage.get("energy_joules")
            if isinstance(joules, (int, float)):
                result.energy_joules = float(joules)
                carbon = line_carbon(self.runtime.current, answer.headers.get("x-joulegate-tier"),
                                     float(joules), ran_at, immediate_instant(row.plan, ran_at))
                if carbon is not None:
                    result.facility_joules = carbon.facility_joules
                    result.co2_g = carbon.co2_g
                    result.co2_g_if_immediate = carbon.co2_g_if_immediate
        return result


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _first(waits: list[Awaitable[Any]]) -> None:
    """Wait for the first of ``waits``; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
