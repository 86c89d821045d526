"""The usage log rotates by size: segments are kept up to ``keep``, the report reads them all
with the current file, and two writers sharing the file (two worker processes) never
rotate the same file twice or lose a record."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway.usage_log import USAGE_LOG_NAME, UsageLog, read_usage, segments

pytestmark = pytest.mark.unit


def _write(log: UsageLog, first: int, count: int, t0: float = 1000.0) -> None:
    log.start()
    for i in range(first, first + count):
        log.append({"t": t0 + i, "tenant": "acme", "i": i, "pad": "x" * 100})
        if i % 10 == 9:
            log.close()  # written now: the next records go in a batch of their own
            log.start()
    log.close()


def test_a_full_log_is_rotated_and_read_back_whole(tmp_path: Path) -> None:
    path = tmp_path / USAGE_LOG_NAME
    log = UsageLog(path, linger_s=0, max_bytes=2000, keep=100)
    _write(log, 0, 100)
    parts = segments(path)
    assert len(parts) >= 4  # ~150 bytes a record: 100 records do not fit in one 2 KB file
    assert all(p.stat().st_size >= 2000 for p in parts)
    assert path.stat().st_size < 2000 + 10 * 160  # the current file: at most one batch over
    assert [r["i"] for r in read_usage(path)] == list(range(100))  # oldest first, none lost
    assert [r["i"] for r in read_usage(path, since=1090)] == list(range(90, 100))


def test_only_the_newest_segments_are_kept(tmp_path: Path) -> None:
    path = tmp_path / USAGE_LOG_NAME
    _write(UsageLog(path, linger_s=0, max_bytes=2000, keep=2), 0, 100)
    assert len(segments(path)) == 2
    got = [r["i"] for r in read_usage(path)]
    assert got == list(range(got[0], 100)) and got[0] > 0  # the oldest were deleted


def test_two_writers_rotate_once_and_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / USAGE_LOG_NAME
    logs = [UsageLog(path, linger_s=0, max_bytes=3000, keep=1000) for _ in range(2)]
    threads = [threading.Thread(target=_write, args=(log, n * 1000, 200))
               for n, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_usage(path)
    assert sorted(r["i"] for r in records) == [*range(200), *range(1000, 1200)]
    # A file is rotated once it is full, never a fresh one moved aside by the second writer.
    assert all(p.stat().st_size >= 3000 for p in segments(path))
    # Every line is a whole record: no batch was split or lost across a rotation.
    assert sum(len(p.read_bytes().splitlines()) for p in [*segments(path), path]) == 400
