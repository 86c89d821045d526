"""Per-tenant joule budgets: windows and the ledger (embedded SQLite or Redis)."""

from pathlib import Path

from policies.schema import LedgerSpec

from .embedded import EmbeddedLedger
from .ledger import Ledger, LedgerUnavailable, Limit, Reservation, WindowState
from .windows import WINDOWS, period

__all__ = ["WINDOWS", "EmbeddedLedger", "Ledger", "LedgerUnavailable", "Limit", "Reservation",
           "WindowState", "open_ledger", "period"]


def open_ledger(spec: LedgerSpec, state_dir: Path) -> Ledger:
    """The ledger a policy asks for: Redis at ``spec.url``, or the embedded SQLite file
    (``spec.path``, default ``<state_dir>/ledger.sqlite``)."""
    if spec.kind == "redis":
        from .redis_ledger import RedisLedger

        return RedisLedger(spec.url or "")
    return EmbeddedLedger(Path(spec.path).expanduser() if spec.path else state_dir / "ledger.sqlite",
                          busy_timeout_ms=spec.busy_timeout_ms)
