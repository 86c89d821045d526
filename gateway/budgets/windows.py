"""Budget windows: fixed periods aligned to UTC.

``1m``, ``1h``, ``1d``, ``7d`` and ``30d`` are fixed-length periods counted from the Unix
epoch (``7d`` periods start on Thursdays, the epoch's weekday); ``calendar-month`` runs
from the first of a UTC month to the first of the next. A budget's spend resets when its
period ends, so "seconds until the window frees" is the time to the period's end.
"""

from __future__ import annotations

import calendar
import time
from datetime import UTC, datetime

WINDOW_SECONDS = {"1m": 60, "1h": 3600, "1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
WINDOWS = (*WINDOW_SECONDS, "calendar-month")


def period(window: str, now: float | None = None) -> tuple[int, int]:
    """``(start, end)`` of the period of ``window`` containing ``now``, as Unix seconds."""
    now = time.time() if now is None else now
    if window in WINDOW_SECONDS:
        length = WINDOW_SECONDS[window]
        start = int(now // length) * length
        return start, start + length
    if window == "calendar-month":
        day = datetime.fromtimestamp(now, tz=UTC)
        first = datetime(day.year, day.month, 1, tzinfo=UTC)
        year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
        following = datetime(year, month, 1, tzinfo=UTC)
        return calendar.timegm(first.timetuple()), calendar.timegm(following.timetuple())
    raise ValueError(f"unknown budget window {window!r}; expected one of {', '.join(WINDOWS)}")
