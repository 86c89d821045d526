"""Admission under joule budgets: reserve before a request runs, settle after.

:meth:`BudgetGuard.admit` predicts the request's joules from the tier's calibration
(estimated prompt tokens x J/prompt token + max_tokens x J/output token) and reserves
them against every window of the tenant's budgets on the request's planned tier. If they
do not fit, it tries the plan's degrade options (the cheaper tiers of the tenant's degrade
ladder, most capable first, with ``degrade_max_tokens``) and moves the plan to the first that
fits (:meth:`~gateway.routing.TierPlan.degrade`); if nothing fits, the request gets 429 with ``Retry-After`` set
to when the refusing window's period ends. :meth:`BudgetGuard.settle` records the joules
the request actually used; a settle that cannot reach the ledger is queued and retried,
so no joule is lost. With ``fail_open``, requests admitted while the ledger is down are
served and their spend is recorded (idempotently) once it is back.

A window in another unit than joules (``unit:`` facility_kwh, litres, gco2) is charged
the request's joules converted with the factors of the candidate tier's site at
reservation time (``factors``, :mod:`gateway.sustainability`); the settle spends the
measured joules at those same factors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from backends import GenerationRequest
from policies import Policy, TenantSpec, TierSpec

from ..energy import Calibration
from ..errors import BudgetExhausted, BudgetNeverFits, LedgerUnavailableError
from ..metrics import Metrics
from ..routing import TierPlan
from ..supervise import Backoff, Supervisor, supervise
from ..sustainability import Factors, format_amount, from_unit, to_unit
from .ledger import Ledger, LedgerUnavailable, Limit, Reservation, WindowState

log = logging.getLogger("joulegate.budgets")

#: Admissions set a tenant's budget gauges at most this often (seconds).
GAUGE_EVERY_S = 0.25


def _fraction(window: WindowState) -> float:
    """The share of a window's budget still free (0 when none is granted)."""
    total = window.limit + window.granted
    return max(window.remaining, 0.0) / total if total > 0 else 0.0


def _until_fits(reservation: Reservation, now: float) -> tuple[float, WindowState] | None:
    """How long until ``reservation.joules`` fit every window, and the window that binds
    longest: 0 s where only requests in flight hold the room (they free it as they finish),
    the period's end where spent joules must reset; ``None`` when a window's whole budget
    is smaller than the request."""
    binding: tuple[float, WindowState] | None = None
    for w in reservation.windows:
        need = reservation.joules * w.factor
        if need <= w.remaining:
            continue
        if need > w.limit + w.granted:
            return None
        wait = 0.0 if need <= w.limit + w.granted - w.spent \
            else max(w.period_end - now, 0.0)
        if binding is None or wait > binding[0]:
            binding = (wait, w)
    return binding


def estimate_prompt_tokens(generation: GenerationRequest) -> int:
    """About 4 characters per token, plus a few tokens of chat framing per message; an
    assistant's calls, the tools and the response schema count as their JSON (the backend
    puts them in the prompt), a fill-in-the-middle suffix as its text."""
    if generation.messages is None:
        return (len(generation.prompt or "") + len(generation.suffix or "")) // 4 + 1
    tokens = sum(len(m.get("content") or "") // 4 + 4 for m in generation.messages)
    chars = sum(len(orjson.dumps(m["tool_calls"])) for m in generation.messages
                if m.get("tool_calls"))
    for tool in generation.tools or ():
        chars += len(orjson.dumps(tool.to_openai()))
    if generation.response_format is not None and generation.response_format.schema:
        chars += len(orjson.dumps(generation.response_format.schema))
    return tokens + chars // 4


@dataclass
class Admission:
    """What the budget admitted: the tier is the plan's (a degrade moved it)."""

    max_tokens: int | None
    reservation: Reservation | None = None
    warning: str | None = None
    #: fail_open while the ledger was unreachable: spend is recorded later.
    offline: bool = False
    #: The windows as reserved (their unit factors), for a later record of offline spend.
    limits: list[Limit] | None = None


@dataclass(frozen=True, slots=True)
class Settle:
    """A reservation to settle with the joules the request used."""

    tenant: str
    request_id: str
    joules: float

    async def apply(self, ledger: Ledger) -> None:
        await ledger.settle(self.tenant, self.request_id, self.joules)


@dataclass(frozen=True, slots=True)
class Record:
    """Spend served unmetered (fail_open) to record once the ledger is back."""

    tenant: str
    request_id: str
    joules: float
    limits: list[Limit]
    at: float

    async def apply(self, ledger: Ledger) -> None:
        await ledger.record(self.tenant, self.request_id, self.joules, self.limits, self.at)


class BudgetGuard:
    def __init__(self, ledger: Ledger, ttl_s: float, fail_open: bool, metrics: Metrics,
                 calibration: Calibration, *, reconcile_every_s: float = 1.0,
                 expire_every_s: float = 30.0, backoff: Backoff | None = None):
        self.ledger = ledger
        self.ttl_s = ttl_s
        self.fail_open = fail_open
        self.metrics = metrics
        self.calibration = calibration
        self._pending: list[Settle | Record] = []  # waiting for the ledger
        #: Settles started without waiting (:meth:`settle` with ``wait=False``), in flight.
        self._settling: set[asyncio.Future[bool]] = set()
        #: The reconcile loop (:meth:`_reconcile`), supervised: restarted when it fails.
        self.reconcile_every_s = reconcile_every_s
        self.expire_every_s = expire_every_s
        self.backoff = backoff or Backoff()
        self.reconciler: Supervisor | None = None
        self._swept_at: float | None = None  # loop time of the last expiry sweep
        #: Budgeted tenants seen so far (bounded by the policy), whose gauges are refreshed.
        self._watched: dict[str, list[Limit]] = {}
        #: Each tenant's limits with the policy entry they were made from (made once per
        #: entry, not per request).
        self._limits_of: dict[str, tuple[TenantSpec, list[Limit]]] = {}
        #: tenant → the smallest remaining fraction over its windows, as last seen.
        self._remaining: dict[str, float] = {}
        #: tenant → monotonic time its budget gauges were last set by an admission.
        self._gauged_at: dict[str, float] = {}

    def start(self) -> None:
        self.reconciler = supervise("budget_reconcile", self._reconcile, self.metrics,
                                    self.backoff)

    async def close(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.close()
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
            await asyncio.sleep(0)  # their done-callbacks (a failure joins _pending)
        await self._flush()
        if self._pending:
            log.error("%d budget settles could not reach the ledger before shutdown",
                      len(self._pending))
        await self.ledger.close()

    def watch(self, policy: Policy) -> None:
        """Refresh the budget gauges of every budgeted tenant of ``policy`` from now on, not
        only of tenants seen since start (dashboards and alerts see idle tenants too)."""
        self._watched = {}
        for name, spec in policy.tenants.items():
            if not spec.budgets:
                continue
            self._watched[name] = self._joule_limits(name, spec)
            # Counters start at zero, so the first refusal is an increase a rate() sees.
            for reason in ("exhausted", "exceeds_window", "ledger_down", "ledger_down_served"):
                self.metrics.budget_rejections.labels(name, reason)
            for budget in spec.budgets:
                self.metrics.budget_soft_ratio.labels(name, budget.window).set(
                    budget.soft_pct / 100)

    @staticmethod
    def limits(spec: TenantSpec, factors: Factors | None = None) -> list[Limit]:
        """The tenant's windows as ledger limits; a window in another unit than joules is
        converted with ``factors`` (default: PUE 1, no water, no carbon)."""
        if factors is None:
            factors = Factors("default")
        return [Limit(b.window, from_unit(b.amount, b.unit), factors.per_joule(b.unit), b.unit)
                if b.unit != "joules" else Limit(b.window, b.amount) for b in spec.budgets]

    def _joule_limits(self, tenant: str, spec: TenantSpec) -> list[Limit]:
        """:meth:`limits` of the tenant's policy entry, made once per entry."""
        cached = self._limits_of.get(tenant)
        if cached is None or cached[0] is not spec:
            cached = self._limits_of[tenant] = (spec, self.limits(spec))
        return cached[1]

    # -- admission ----------------------------------------------------------------------

    async def admit(self, spec: TenantSpec, tenant: str, plan: TierPlan, request_id: str,
                    generation: GenerationRequest, prompt_tokens: int,
                    factors: Callable[[TierSpec], Factors] | None = None,
                    output_tokens: Callable[[TierSpec, int], int] | None = None) -> Admission:
        """Reserve the request's predicted joules (``prompt_tokens``: the prompt's estimated
        size, :func:`estimate_prompt_tokens`) on the plan's tier, or degrade the plan to the
        first of its cheaper options that fits, or raise :class:`BudgetExhausted` (429, fits
        later) or :class:`BudgetNeverFits` (400). ``output_tokens(tier, max_tokens)``: the
        most a tier can produce of ``max_tokens`` (its context window), which is held."""
        tier = plan.tier
        max_tokens = generation.max_tokens
        if not spec.budgets:
            return Admission(max_tokens)
        if max_tokens is None:  # 0 (an embeddings request) stays 0
            max_tokens = spec.default_max_tokens
        converts = factors is not None and any(b.unit != "joules" for b in spec.budgets)
        limits = self._watched[tenant] = self._joule_limits(tenant, spec)
        cap = min(max_tokens, spec.degrade_max_tokens or max_tokens)
        candidates = [(tier, max_tokens)] + [(t, cap) for t in plan.degrade_options()]
        refused: list[tuple[TierSpec, int, Reservation]] = []
        for candidate, tokens in candidates:
            held = tokens if output_tokens is None else output_tokens(candidate, tokens)
            joules = self.calibration.predict(candidate.name, prompt_tokens, held)
            if converts:
                assert factors is not None
                limits = self.limits(spec, factors(candidate))
            try:
                reservation = await self.ledger.reserve(tenant, request_id, joules, limits,
                                                        self.ttl_s)
            except LedgerUnavailable as exc:
                admission = self._ledger_down(tenant, max_tokens, exc)
                admission.limits = limits
                return admission
            self._seen(tenant, reservation.windows)
            if reservation.ok:
                if candidate is not tier:
                    plan.degrade(candidate)
                    self.metrics.budget_degradations.labels(tenant, tier.name,
                                                            candidate.name).inc()
                return Admission(tokens, reservation,
                                 self._warning(tenant, spec, reservation.windows))
            refused.append((candidate, tokens, reservation))
        refusal = self._refusal(tenant, refused, prompt_tokens,
                                injected=generation.max_tokens is None)
        reason = "exceeds_window" if isinstance(refusal, BudgetNeverFits) else "exhausted"
        self.metrics.budget_rejections.labels(tenant, reason).inc()
        raise refusal

    def _refusal(self, tenant: str, refused: list[tuple[TierSpec, int, Reservation]],
                 prompt_tokens: int, injected: bool) -> BudgetExhausted | BudgetNeverFits:
        """Why nothing fits, told truthfully: a request larger than a window's whole budget
        can never be served (400, with the largest ``max_tokens`` that would fit, and no
        ``Retry-After``: retrying cannot help); one that fits later gets 429 with
        ``Retry-After`` set to when enough budget frees, on the tier that frees first."""
        now = time.time()
        waits = [(fit, c, r) for c, _, r in refused if (fit := _until_fits(r, now)) is not None]
        if waits:
            (wait, short), candidate, reservation = min(waits, key=lambda x: x[0][0])
            retry = max(1, int(wait + 0.999))
            if short.unit != "joules":
                u = short.unit
                held = (f" Requests in flight hold {format_amount(short.reserved, u)} of that "
                        "window until they finish." if short.reserved > 0 else "")
                return BudgetExhausted(
                    f"tenant '{tenant}' has {format_amount(max(short.remaining, 0), u)} left "
                    f"of its {format_amount(short.limit + short.granted, u)} budget for the "
                    f"{short.window} window; this request needs about "
                    f"{format_amount(reservation.joules * short.factor, u)} "
                    f"({reservation.joules:.1f} J) on tier '{candidate.name}'.{held} Enough "
                    f"frees in {retry} s.", headers={"retry-after": str(retry)})
            held = (f" Requests in flight hold {short.reserved:.1f} J of that window until "
                    "they finish." if short.reserved > 0 else "")
            return BudgetExhausted(
                f"tenant '{tenant}' has {max(short.remaining, 0):.1f} J left of its "
                f"{short.limit + short.granted:g} J budget for the {short.window} window; this "
                f"request needs about {reservation.joules:.1f} J on tier '{candidate.name}'."
                f"{held} Enough frees in {retry} s.",
                headers={"retry-after": str(retry)})
        # Every candidate exceeds a window's entire budget: say what would fit.
        best = max(((self._largest_max_tokens(c, r, prompt_tokens), c, r) for c, _, r in refused),
                   key=lambda x: x[0])
        fits, candidate, reservation = best
        window = min(reservation.windows, key=lambda w: (w.limit + w.granted) / w.factor
                     if w.factor > 0 else float("inf"))
        whole = f"{window.limit + window.granted:g} J" if window.unit == "joules" \
            else format_amount(window.limit + window.granted, window.unit)
        why = (f"tenant '{tenant}': this request needs about {reservation.joules:.1f} J on tier "
               f"'{candidate.name}', more than the whole {whole} "
               f"budget of its {window.window} window, so it can never be served as it is")
        why += " (max_tokens was not given: the tenant's default_max_tokens was assumed)" \
            if injected else ""
        hint = (f"; the largest max_tokens that fits is {fits}" if fits >= 1 else
                "; even the prompt alone does not fit: shorten it")
        return BudgetNeverFits(why + hint + ".", param="max_tokens")

    def _largest_max_tokens(self, tier: TierSpec, reservation: Reservation,
                            prompt_tokens: int) -> int:
        """The most output tokens whose predicted joules fit every window's whole budget."""
        base = self.calibration.predict(tier.name, prompt_tokens, 0)
        per_token = self.calibration.predict(tier.name, prompt_tokens, 1) - base
        rooms = [(w.limit + w.granted) / w.factor for w in reservation.windows if w.factor > 0]
        if not rooms:
            return 1 << 20
        room = min(rooms) - base
        if room < 0:
            return 0
        return int(room / per_token) if per_token > 0 else 1 << 20

    def _ledger_down(self, tenant: str, max_tokens: int | None, exc: Exception) -> Admission:
        if self.fail_open:
            self.metrics.budget_rejections.labels(tenant, "ledger_down_served").inc()
            log.warning("budget ledger unavailable (%s): serving %s under fail_open", exc, tenant)
            return Admission(max_tokens, offline=True)
        self.metrics.budget_rejections.labels(tenant, "ledger_down").inc()
        raise LedgerUnavailableError(f"the budget ledger is unavailable ({exc}); requests of "
                                     f"budgeted tenants are refused (fail_closed)",
                                     headers={"retry-after": "5"})

    def _warning(self, tenant: str, spec: TenantSpec, windows: list[WindowState]) -> str | None:
        notes = []
        for budget, state in zip(spec.budgets, windows, strict=True):
            total = state.limit + state.granted
            used = (state.spent + state.reserved) / total * 100 if total > 0 else 100.0
            if used >= budget.soft_pct:
                notes.append(f"{budget.window}={used:.0f}%")
                self.metrics.budget_soft_warnings.labels(tenant, budget.window).inc()
        return ", ".join(notes) or None

    def remaining_fraction(self, tenant: str) -> float | None:
        """The tenant's least remaining budget fraction (over its windows) as last seen by
        an admission or the once-a-second refresh; ``None`` before the first."""
        return self._remaining.get(tenant)

    def _seen(self, tenant: str, windows: list[WindowState], gauges: bool = False) -> None:
        """What the guard saw of the tenant's windows: the remaining fraction (routing's
        budget pressure reads it) always; the gauges when ``gauges`` (the reconcile loop,
        every second) or when an admission finds them older than :data:`GAUGE_EVERY_S` (a
        scrape samples them: setting three gauges per request was CPU for nothing)."""
        if not windows:
            return
        self._remaining[tenant] = min(_fraction(w) for w in windows)
        now = time.monotonic()
        if gauges or now - self._gauged_at.get(tenant, -GAUGE_EVERY_S) >= GAUGE_EVERY_S:
            self._gauged_at[tenant] = now
            m = self.metrics
            for state in windows:
                m.labelled(m.budget_remaining, tenant, state.window).set(
                    to_unit(state.remaining, state.unit))
                m.labelled(m.budget_limit, tenant, state.window).set(
                    to_unit(state.limit + state.granted, state.unit))
            m.labelled(m.budget_reserved, tenant).set(windows[0].reserved)

    # -- settling -----------------------------------------------------------------------

    async def settle(self, spec: TenantSpec, tenant: str, request_id: str,
                     admission: Admission, joules: float, wait: bool = True) -> None:
        """Record the joules the request used. With ``wait=False`` a ledger that applies
        its operations in order (:meth:`Ledger.settle_soon`) is only handed the settle, so
        the response does not wait for it; anything asked of the ledger afterwards still
        sees it done, a settle the ledger could not take is queued and retried like any
        other, and :meth:`close` waits for those in flight."""
        op: Settle | Record
        if admission.reservation is not None:
            op = Settle(tenant, request_id, joules)
            if not wait and self._settle_soon(op):
                return
        elif admission.offline:
            op = Record(tenant, request_id, joules, admission.limits or self.limits(spec),
                        time.time())
        else:
            return
        try:
            await op.apply(self.ledger)
        except LedgerUnavailable:
            self._pending.append(op)

    def _settle_soon(self, op: Settle) -> bool:
        """Hand ``op`` to the ledger without waiting; False when it cannot take it so."""
        try:
            started = self.ledger.settle_soon(op.tenant, op.request_id, op.joules)
        except LedgerUnavailable:
            self._pending.append(op)
            return True
        if started is None:
            return False
        self._settling.add(started)

        def settled(done: asyncio.Future[bool]) -> None:
            self._settling.discard(done)
            exc = None if done.cancelled() else done.exception()
            if done.cancelled() or isinstance(exc, LedgerUnavailable):
                self._pending.append(op)
            elif exc is not None:
                log.error("budget settle of request %s failed: %r", op.request_id, exc)

        started.add_done_callback(settled)
        return True

    async def _flush(self) -> None:
        while self._pending:
            try:
                await self._pending[0].apply(self.ledger)
            except LedgerUnavailable:
                return
            self._pending.pop(0)

    async def _reconcile(self) -> None:
        """Every ``reconcile_every_s`` (1 s): retry queued settles and refresh the budget
        gauges of the tenants seen (which also returns their expired reservations), and let
        the ledger do its housekeeping (:meth:`Ledger.maintain`); every
        ``expire_every_s`` (30 s): sweep every tenant's expired reservations. Supervised: an
        unexpected failure restarts it (the sweep's clock survives the restart)."""
        loop = asyncio.get_running_loop()
        if self._swept_at is None:
            self._swept_at = loop.time()
        while True:
            await asyncio.sleep(self.reconcile_every_s)
            if self._pending:
                await self._flush()
            for tenant, limits in list(self._watched.items()):
                with contextlib.suppress(LedgerUnavailable):
                    self._seen(tenant, await self.ledger.status(tenant, limits), gauges=True)
            await self.ledger.maintain()
            if loop.time() - self._swept_at >= self.expire_every_s:
                with contextlib.suppress(LedgerUnavailable):
                    await self.ledger.expire()
                    self._swept_at = loop.time()
