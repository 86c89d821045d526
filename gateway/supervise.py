"""Background loops that do not die silently.

:func:`supervise` runs a loop (the budget reconcile, the health watcher, the calibration
saver, energy timers, meter pollers) as a task that is restarted when it raises: the
exception is logged with its traceback, ``joulegate_background_task_restarts_total{task}``
counts the restart, and the loop starts again after an exponential backoff (reset once a
run has stayed up for ``healthy_after_s``). A loop that *returns* is done and is not
restarted. :meth:`Supervisor.close` cancels and awaits the task in whatever state it is
(running, in backoff, finished); :meth:`Supervisor.cancel` is its synchronous half, for
owners that close synchronously (the task then ends at the loop's next turn).

Supervisors are owned by what runs the loop (the runtime, the budget guard, a device);
there is no registry of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("joulegate")


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before restarting a crashed loop: ``first_s``, doubling up to
    ``max_s``; back to ``first_s`` after a run that lasted ``healthy_after_s``."""

    first_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 60.0

    def next(self, delay: float) -> float:
        return min(delay * 2, self.max_s)


class Supervisor:
    """One supervised background loop (see the module docstring)."""

    def __init__(self, name: str, factory: Callable[[], Awaitable[None]],
                 metrics: Metrics | None = None, backoff: Backoff | None = None):
        self.name = name
        self.factory = factory
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        #: ``idle`` (not started), ``running``, ``backoff`` (crashed, waiting to restart),
        #: ``done`` (returned) or ``closed``.
        self.state = "idle"
        #: How many times the loop raised, and how many times it was restarted.
        self.crashes = 0
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        if metrics is not None:  # the counter starts at zero: the first restart is a rate
            metrics.background_task_restarts.labels(name)

    def start(self) -> Supervisor:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"joulegate:{self.name}")
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff.first_s
        while True:
            self.state = "running"
            began = loop.time()
            try:
                await self.factory()
            except Exception:  # restarted below (CancelledError is no Exception: it passes)
                self.crashes += 1
                if loop.time() - began >= self.backoff.healthy_after_s:
                    delay = self.backoff.first_s
                log.exception("background task %s failed; restarting it in %.1f s",
                              self.name, delay)
            else:
                self.state = "done"
                return
            self.state = "backoff"
            await asyncio.sleep(delay)
            delay = self.backoff.next(delay)
            self.restarts += 1
            if self.metrics is not None:
                self.metrics.background_task_restarts.labels(self.name).inc()
            log.info("background task %s restarted (%d restarts)", self.name, self.restarts)

    def cancel(self) -> None:
        """Ask the task to stop (it ends at the event loop's next turn)."""
        if self._task is not None:
            self._task.cancel()
        self.state = "closed"

    async def close(self) -> None:
        """Cancel the task and wait until it has ended, whatever state it was in."""
        task, self._task = self._task, None
        self.state = "closed"
        if task is None:
            return
        task.cancel()
        # gather() with return_exceptions retrieves a CancelledError or a crash alike, so
        # nothing is left unretrieved; a task that already ended returns at once.
        await asyncio.gather(task, return_exceptions=True)


def supervise(name: str, factory: Callable[[], Awaitable[None]], metrics: Metrics | None = None,
              backoff: Backoff | None = None) -> Supervisor:
    """Start ``factory()`` as a supervised task on the running loop (see :class:`Supervisor`)."""
    return Supervisor(name, factory, metrics, backoff).start()
