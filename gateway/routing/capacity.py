"""Mixture-of-Depths style capacity: a costly tier takes at most a fraction of a tenant's
requests (or joules) in a sliding window, and the hardest requests take it.

Causal, one decision at a time: a request may use the tier only if

1. its score is at least the rolling quantile of the window's recent scores that leaves
   ``fraction`` above it (once the window holds enough scores to estimate it), and
2. the window's realised share, counting this request, stays within ``fraction`` (a burst
   of one request is allowed while the window is young).

Every routed request of the tenant is recorded (score, whether it used the tier, joules),
so the quantile and the share are over all of the tenant's routed traffic. Joules are
recorded as predicted at the decision and replaced by the measured ones when the request
finishes. State is per gateway process.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

from policies import CapacitySpec

#: Entries kept per window at most (the oldest go first), bounding memory and work.
MAX_ENTRIES = 4096


@dataclass(slots=True)
class Entry:
    at: float
    score: float
    used: bool
    joules: float
    live: bool = True


class CapacityWindow:
    def __init__(self, spec: CapacitySpec, tier: str = ""):
        self.spec = spec
        self.tier = tier
        self._entries: deque[Entry] = deque()
        self._sorted: list[float] = []  # the window's scores, sorted
        self._used = 0
        self._used_joules = 0.0
        self._joules = 0.0

    def _expire(self, now: float) -> None:
        horizon = now - self.spec.window_s
        while self._entries and (self._entries[0].at < horizon
                                 or len(self._entries) > MAX_ENTRIES):
            self._drop(self._entries.popleft())

    def _drop(self, e: Entry) -> None:
        e.live = False
        del self._sorted[bisect.bisect_left(self._sorted, e.score)]
        self._used -= e.used
        self._joules -= e.joules
        if e.used:
            self._used_joules -= e.joules

    def quantile_threshold(self, now: float | None = None) -> float | None:
        """The score above which ``fraction`` of recent scores lie; ``None`` while the window
        holds fewer than ``ceil(1 / fraction)`` scores."""
        self._expire(time.monotonic() if now is None else now)
        n = len(self._sorted)
        if n < math.ceil(1 / self.spec.fraction):
            return None
        return self._sorted[min(int(n * (1 - self.spec.fraction)), n - 1)]

    def admits(self, score: float, joules: float, now: float | None = None,
               entry: Entry | None = None) -> bool:
        """Whether a request of ``score`` and predicted ``joules`` may use the tier now.
        ``entry``: the request's own, already recorded and not using the tier (a cascade
        asks after routing recorded it), so that it is not counted twice."""
        now = time.monotonic() if now is None else now
        threshold = self.quantile_threshold(now)
        if threshold is not None and score < threshold:
            return False
        mine = entry if entry is not None and entry.live else None
        n = len(self._entries) + (1 if mine is None else 0)
        others = self._joules - (0.0 if mine is None else mine.joules)
        if self.spec.by == "requests":
            return self._used + 1 <= max(1.0, self.spec.fraction * n)
        return self._used_joules + joules <= max(joules, self.spec.fraction * (others + joules))

    def record(self, score: float, used: bool, joules: float, now: float | None = None) -> Entry:
        now = time.monotonic() if now is None else now
        self._expire(now)
        entry = Entry(now, score, used, joules)
        self._entries.append(entry)
        bisect.insort(self._sorted, score)
        self._used += used
        self._joules += joules
        if used:
            self._used_joules += joules
        return entry

    def rescore(self, entry: Entry, score: float) -> None:
        """The request's score became known later (a cascade's probe): it replaces the one
        recorded, in the quantile too."""
        if entry.live:
            del self._sorted[bisect.bisect_left(self._sorted, entry.score)]
            bisect.insort(self._sorted, score)
        entry.score = score

    def reassign(self, entry: Entry, used: bool) -> None:
        """Whether ``entry``'s request uses the tier changed (it moved to another tier)."""
        if entry.live and entry.used != used:
            self._used += used - entry.used
            self._used_joules += entry.joules if used else -entry.joules
        entry.used = used

    def settle(self, entry: Entry, joules: float) -> None:
        """Replace an entry's predicted joules with the measured ones."""
        if entry.live:
            delta = joules - entry.joules
            self._joules += delta
            if entry.used:
                self._used_joules += delta
        entry.joules = joules

    def fraction(self, now: float | None = None) -> float:
        """The realised share of requests (or joules) that used the tier in the window."""
        self._expire(time.monotonic() if now is None else now)
        if self.spec.by == "requests":
            return self._used / len(self._entries) if self._entries else 0.0
        return self._used_joules / self._joules if self._joules > 0 else 0.0


class CapacityTracker:
    """The windows of every (tenant, tier) with a capacity, kept across policy reloads
    while the tier's capacity settings stay the same."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], CapacityWindow] = {}

    def window(self, tenant: str, tier: str, spec: CapacitySpec) -> CapacityWindow:
        key = (tenant, tier)
        window = self._windows.get(key)
        if window is None or (window.spec is not spec and window.spec != spec):
            window = self._windows[key] = CapacityWindow(spec, tier)
        return window
