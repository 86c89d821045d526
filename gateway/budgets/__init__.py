"""Per-tenant joule budgets: windows and the ledger (embedded SQLite or Redis)."""

from .embedded import EmbeddedLedger
from .ledger import Ledger, LedgerUnavailable, Limit, Reservation, WindowState
from .windows import WINDOWS, period

__all__ = ["WINDOWS", "EmbeddedLedger", "Ledger", "LedgerUnavailable", "Limit", "Reservation",
           "WindowState", "period"]
