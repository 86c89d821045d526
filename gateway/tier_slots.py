"""A cap on the requests one tier holds at once (running or queued at its backend), per
worker process: past ``server.limits.max_pending_per_tier`` a tier takes no more, the plan
moves on as when a backend is unavailable, and with no tier left the answer is 503
``tier_queue_full`` with ``Retry-After``. The counts outlive policy reloads (a tier's
requests in flight stay counted under its name)."""

from __future__ import annotations

from backends import BackendUnavailable


class TierQueueFull(BackendUnavailable):
    """The tier already holds as many requests as the policy allows."""

    def __init__(self, tier: str, cap: int):
        super().__init__(f"tier '{tier}' already holds {cap} requests "
                         "(server.limits.max_pending_per_tier)", retry_after_s=1.0)


class TierSlots:
    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def enter(self, tier: str, cap: int) -> None:
        """Take a place on ``tier`` or raise :class:`TierQueueFull`."""
        held = self._held.get(tier, 0)
        if held >= cap:
            raise TierQueueFull(tier, cap)
        self._held[tier] = held + 1

    def leave(self, tier: str) -> None:
        held = self._held.get(tier, 0) - 1
        if held > 0:
            self._held[tier] = held
        else:
            self._held.pop(tier, None)

    def held(self, tier: str) -> int:
        return self._held.get(tier, 0)
