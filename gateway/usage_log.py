"""The usage log: one compact JSON line per finished request, in ``<state_dir>/usage.jsonl``.

It is what ``joulegate report`` reads (the ledger keeps only per-window sums). A request
hands its record to :meth:`UsageLog.append`, which only puts it on a queue; a writer thread
encodes and appends the queued lines in batches, so the event loop never waits on the disk.
Each batch is one ``write`` to a file opened with ``O_APPEND``, so several worker processes
may share the file. Records are never rewritten; lost ones (a crash before the writer ran)
only make the report smaller.

A record's keys: ``t`` (Unix time at the end), ``tenant``, ``tier``, ``site``, ``ep``
(endpoint), ``status``, ``pt``/``ct`` (prompt/completion tokens), ``j`` (IT joules), ``es``
(their source), ``fj`` (facility joules), ``w`` (water, mL), ``co2`` (grams), ``g``
(gCO₂/kWh used), ``cs`` (its source), and for deferred work ``sub`` (Unix time it was
submitted, when it could have run at once).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("joulegate")

USAGE_LOG_NAME = "usage.jsonl"
_STOP = object()


class UsageLog:
    """Appends records to ``path`` from a background thread (see the module docstring)."""

    def __init__(self, path: str | Path, batch: int = 512, linger_s: float = 0.2):
        self.path = Path(path)
        self.batch = batch
        #: How long the writer waits after a record for more to join its batch: a thread
        #: woken for every request cost each request a context switch (~0.1 ms on one core).
        self.linger_s = linger_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.errors = 0

    def start(self) -> UsageLog:
        if self._thread is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._run, name="joulegate-usage-log",
                                            daemon=True)
            self._thread.start()
        return self

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record (never blocks)."""
        if self._thread is not None:
            self._queue.put(record)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            if items[0] is not _STOP and self._queue.qsize() < self.batch:
                time.sleep(self.linger_s)
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            lines = b"".join(orjson.dumps(item) + b"\n" for item in items if item is not _STOP)
            if lines:
                self._write(lines)
                self.written += len(items) - stop
            if stop:
                return

    def _write(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                log.warning("usage log %s: %s (%d errors)", self.path, exc, self.errors)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout_s)


def read_usage(path: str | Path, since: float | None = None) -> list[dict[str, Any]]:
    """The records of a usage log (at or after ``since``, Unix time); a torn last line or
    any line that is not a record is skipped."""
    records: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and (since is None or record.get("t", 0) >= since):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records
