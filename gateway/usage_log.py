"""The usage log: one compact JSON line per finished request, in ``<state_dir>/usage.jsonl``.

It is what ``joulegate report`` reads (the ledger keeps only per-window sums). A request
hands its record to :meth:`UsageLog.append`, which only puts it on a queue; a writer thread
encodes and appends the queued lines in batches, so the event loop never waits on the disk.
Each batch is one ``write`` to a file opened with ``O_APPEND``, so several worker processes
may share the file. Records are never rewritten; lost ones (a crash before the writer ran)
only make the report smaller.

Rotation: once the file holds ``max_bytes`` (policy ``server.usage_log.max_mb``), the writer
that finds it so renames it ``usage-<UTC time>.jsonl`` (under an ``flock`` on
``usage.jsonl.lock``, so two workers never rotate the same file twice) and starts a new one;
the oldest segments beyond ``keep`` are deleted. :func:`read_usage` reads the kept segments
and the current file, oldest first. The file is opened by name for every batch, so an
outside ``logrotate`` that moves it works too.

A record's keys: ``t`` (Unix time at the end), ``tenant``, ``tier``, ``site``, ``ep``
(endpoint), ``status``, ``pt``/``ct`` (prompt/completion tokens), ``j`` (IT joules), ``es``
(their source), ``fj`` (facility joules), ``w`` (water, mL), ``co2`` (grams), ``g``
(gCO₂/kWh used), ``cs`` (its source), and for deferred work ``sub`` (Unix time it was
submitted, when it could have run at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("joulegate")

USAGE_LOG_NAME = "usage.jsonl"
_STOP = object()


class UsageLog:
    """Appends records to ``path`` from a background thread (see the module docstring)."""

    def __init__(self, path: str | Path, batch: int = 512, linger_s: float = 0.2,
                 max_bytes: int = 64 << 20, keep: int = 20):
        self.path = Path(path)
        self.max_bytes, self.keep = max_bytes, keep
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
                if os.fstat(fd).st_size >= self.max_bytes and self._rotate(fd):
                    os.close(fd)
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                log.warning("usage log %s: %s (%d errors)", self.path, exc, self.errors)

    def _rotate(self, fd: int) -> bool:
        """Move the full file (open as ``fd``) aside and prune old segments, unless another
        writer already did; whether the file at ``path`` changed."""
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return True
            if current.st_ino != os.fstat(fd).st_ino:
                return True  # rotated by another writer meanwhile
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = self.path.with_name(f"{self.path.stem}-{stamp}-{time.time_ns() % 10**9:09d}"
                                       f"{self.path.suffix}")
            os.rename(self.path, name)
            for old in segments(self.path)[:-self.keep or None]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout_s)


def segments(path: str | Path) -> list[Path]:
    """The rotated segments of the usage log at ``path``, oldest first."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}-*{path.suffix}"))


def _files(path: Path, since: float | None) -> Iterator[Path]:
    """The usage log's files that may hold records at or after ``since``, oldest first:
    a segment last written before ``since`` holds none."""
    for segment in segments(path):
        with contextlib.suppress(FileNotFoundError):
            if since is None or segment.stat().st_mtime >= since:
                yield segment
    yield path


def read_usage(path: str | Path, since: float | None = None) -> list[dict[str, Any]]:
    """The records of a usage log, its rotated segments included (at or after ``since``,
    Unix time); a torn last line or any line that is not a record is skipped."""
    records: list[dict[str, Any]] = []
    for name in _files(Path(path), since):
        try:
            with open(name, "rb") as f:
                for line in f:
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and (since is None
                                                     or record.get("t", 0) >= since):
                        records.append(record)
        except FileNotFoundError:  # pruned or rotated while we read
            pass
    return records
