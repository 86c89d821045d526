"""How a benchmark hands in its result: printed, and written to ``benchmarks/results/``."""

from __future__ import annotations

import resource
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish(report: str, prefix: str) -> Path:
    """Print ``report`` and write it to ``benchmarks/results/<prefix>-<time>.md``."""
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(report)
    print(f"wrote {out}")
    return out
