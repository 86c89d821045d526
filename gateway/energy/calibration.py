"""Per-tier joules per prompt token and per output token, learned online.

Each tier models a request's energy as ``J = a x prompt_tokens + b x output_tokens``.
``a`` and ``b`` are fitted by exponentially weighted least squares: the sufficient
statistics (sums of P², P·O, O², P·J, O·J) decay by half every ``half_life`` requests,
so the fit follows the recent past like an EWMA while learning both coefficients. A
ridge term pulls the fit toward the policy's seeds with the weight of ``prior_requests``
typical requests (default 1), so a fresh tier predicts its seeds and a tier whose requests all have
the same shape still has a unique answer. The table persists across restarts.

Budgets and routing call :meth:`Calibration.predict` before a request runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_TYPICAL_TOKENS = 100.0


@dataclass
class TierFit:
    seed_prompt: float
    seed_output: float
    spp: float = 0.0
    spo: float = 0.0
    soo: float = 0.0
    spj: float = 0.0
    soj: float = 0.0
    n: float = 0.0
    updated: float = field(default_factory=time.time)

    def coefficients(self, prior_requests: float) -> tuple[float, float]:
        k = prior_requests * _TYPICAL_TOKENS ** 2
        a11, a12, a22 = self.spp + k, self.spo, self.soo + k
        b1, b2 = self.spj + k * self.seed_prompt, self.soj + k * self.seed_output
        det = a11 * a22 - a12 * a12
        a = (b1 * a22 - b2 * a12) / det
        b = (a11 * b2 - a12 * b1) / det
        if a < 0:  # keep the fit physical: refit the other coefficient alone
            a, b = 0.0, max(b2 / a22, 0.0)
        elif b < 0:
            a, b = max(b1 / a11, 0.0), 0.0
        return a, b


class Calibration:
    """The per-tier table; thread-safe; persisted with :meth:`save`."""

    def __init__(self, path: Path | None = None, half_life: float = 200.0,
                 prior_requests: float = 1.0):
        self.path = path
        self.decay = 0.5 ** (1.0 / half_life)
        self.prior_requests = prior_requests
        self._fits: dict[str, TierFit] = {}
        self._lock = threading.Lock()
        self.dirty = False
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
                self._fits = {tier: TierFit(**fit) for tier, fit in saved.get("tiers", {}).items()}
            except (ValueError, TypeError):
                self._fits = {}  # a damaged file: start again from the seeds

    def seed(self, tier: str, joules_per_prompt_token: float, joules_per_output_token: float) -> None:
        """Set the policy's seeds; what was learned for the tier is kept."""
        with self._lock:
            fit = self._fits.get(tier)
            if fit is None:
                self._fits[tier] = TierFit(joules_per_prompt_token, joules_per_output_token)
            else:
                fit.seed_prompt, fit.seed_output = joules_per_prompt_token, joules_per_output_token

    def update(self, tier: str, prompt_tokens: int, output_tokens: int, joules: float) -> None:
        if prompt_tokens <= 0 and output_tokens <= 0:
            return
        p, o, j, d = float(prompt_tokens), float(output_tokens), float(joules), self.decay
        with self._lock:
            fit = self._fits.setdefault(tier, TierFit(0.0, 0.0))
            fit.spp = fit.spp * d + p * p
            fit.spo = fit.spo * d + p * o
            fit.soo = fit.soo * d + o * o
            fit.spj = fit.spj * d + p * j
            fit.soj = fit.soj * d + o * j
            fit.n = fit.n * d + 1
            fit.updated = time.time()
            self.dirty = True

    def per_token(self, tier: str) -> tuple[float, float]:
        """(joules per prompt token, joules per output token) for ``tier``."""
        with self._lock:
            fit = self._fits.get(tier)
            return fit.coefficients(self.prior_requests) if fit else (0.0, 0.0)

    def predict(self, tier: str, prompt_tokens: int, max_output_tokens: int) -> float:
        a, b = self.per_token(tier)
        return a * prompt_tokens + b * max_output_tokens

    def table(self) -> list[dict[str, float | str]]:
        rows: list[dict[str, float | str]] = []
        for tier in sorted(self._fits):
            a, b = self.per_token(tier)
            fit = self._fits[tier]
            rows.append({"tier": tier, "joules_per_prompt_token": a, "joules_per_output_token": b,
                         "effective_requests": fit.n, "seed_prompt": fit.seed_prompt,
                         "seed_output": fit.seed_output, "updated": fit.updated})
        return rows

    def save(self) -> None:
        """Write the table atomically (a temp file renamed over the old one)."""
        if self.path is None:
            return
        with self._lock:
            data = {"version": 1, "tiers": {t: asdict(f) for t, f in self._fits.items()}}
            self.dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)
