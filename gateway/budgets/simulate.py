"""Replay a file of requests against a policy's budgets, without loading a model.

Each request (tenant, prompt tokens, ``max_tokens``, optionally a pinned tier, the tokens it
really produced and when it arrived) goes through the gateway's own admission,
:meth:`BudgetGuard.admit`, and is settled with :meth:`BudgetGuard.settle`, against a fresh
embedded ledger in a temporary folder (never the policy's real ledger), with the
calibration seeded from the policy's tiers. So a simulation decides exactly as the gateway
would: served, degraded to a cheaper tier, or refused.

What the simulation assumes, where the gateway would know more:

- ``model`` absent or ``auto`` runs on the tenant's ``default_tier``: the file has no prompt
  text to score for difficulty routing. A tier or model name pins its tier, as in the gateway
  (a name the tenant may not use is refused, ``model_not_found``).
- Requests run one after the other: each is settled before the next is admitted.
- A served request spends ``prompt_tokens x J/prompt token + completion_tokens x J/output
  token`` of the tier that served it (the tier's seeds); ``completion_tokens`` defaults to the
  admitted ``max_tokens`` and never exceeds it (a degraded request may be capped lower).
- ``time`` (Unix seconds or ISO-8601; UTC when no zone is given) drives the budget windows; a
  request without one arrives at the previous request's time (the first: now).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backends import GenerationRequest
from policies import AUTO_MODEL, Policy, RoutingSpec

from ..energy import Calibration
from ..errors import APIError
from ..metrics import Metrics
from ..routing import Decision, RouteRefusal, TierPlan, degrade_ladder
from ..routing.tiers import resolve_model
from .embedded import EmbeddedLedger
from .guard import BudgetGuard
from .ledger import Limit, Reservation, WindowState

COLUMNS = ("tenant", "prompt_tokens", "max_tokens", "model", "completion_tokens", "time")
#: The guard's error codes, as refusal reasons.
_REASONS = {"budget_exhausted": "exhausted", "budget_exceeds_window": "exceeds_window"}


class SimulationInputError(ValueError):
    """The request file cannot be read or a row is invalid (``where``: ``FILE:LINE``)."""


@dataclass(frozen=True, slots=True)
class SimRequest:
    #: Where the request is in its file (line number; for CSV, counting the header).
    line: int
    tenant: str
    prompt_tokens: int
    max_tokens: int | None = None
    model: str | None = None
    completion_tokens: int | None = None
    time: float | None = None


@dataclass(slots=True)
class RequestOutcome:
    index: int
    line: int
    tenant: str
    time: float
    #: The tier asked for (pinned, or the tenant's default tier); None if the model is unknown.
    requested_tier: str | None
    #: ``served`` (on the requested tier), ``degraded`` (on a cheaper one) or ``refused``.
    outcome: str
    #: The tier that served it.
    tier: str | None = None
    #: ``max_tokens`` as admitted (the tenant's default when the request gave none; the
    #: degrade cap when degraded).
    max_tokens: int | None = None
    completion_tokens: int = 0
    #: Joules reserved before it ran (the prediction) and spent after.
    predicted_joules: float = 0.0
    joules: float = 0.0
    #: Why it was refused: ``exhausted``, ``exceeds_window`` or ``model_not_found``.
    reason: str | None = None
    #: Refused: the windows without room for it on the requested tier.
    short_windows: list[str] = field(default_factory=list)
    #: The soft-limit warning a response would carry (``1h=83%``).
    warning: str | None = None


@dataclass(slots=True)
class TenantSummary:
    tenant: str
    requests: int = 0
    #: On the tier asked for.
    served: int = 0
    #: On a cheaper tier; ``degraded_by["big->small"]`` counts them by move.
    degraded: int = 0
    degraded_by: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)
    joules: float = 0.0
    joules_by_tier: dict[str, float] = field(default_factory=dict)
    #: The budget windows at the end of the simulation (empty: no budgets).
    windows: list[WindowState] = field(default_factory=list)


@dataclass(slots=True)
class SimulationReport:
    #: Simulated clock at the first and the last request.
    start: float
    end: float
    #: By tenant, in order of first appearance in the file.
    tenants: dict[str, TenantSummary]
    requests: list[RequestOutcome]

    @property
    def joules(self) -> float:
        return sum(t.joules for t in self.tenants.values())


# -- reading the file ---------------------------------------------------------------------


def read_requests(path: str | Path, text: str | None = None) -> list[SimRequest]:
    """The requests of a JSONL file (one object a line) or a CSV file (a header row), told
    apart by the extension (``.jsonl``, ``.ndjson``, ``.json``, ``.csv``) or else by whether
    the first non-blank character is ``{``. ``text``: the content, when already read."""
    name = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is not a column
        except (OSError, UnicodeDecodeError) as exc:
            raise SimulationInputError(f"{name}: cannot read the request file: {exc}") from None
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        is_json = True
    elif suffix == ".csv":
        is_json = False
    else:
        is_json = text.lstrip().startswith("{")
    rows = _jsonl_rows(name, text) if is_json else _csv_rows(name, text)
    requests = [_request(name, line, row) for line, row in rows]
    if not requests:
        raise SimulationInputError(f"{name}: no requests in the file")
    return requests


def _jsonl_rows(name: str, text: str) -> Iterator[tuple[int, dict[str, object]]]:
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SimulationInputError(f"{name}:{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise SimulationInputError(f"{name}:{number}: expected a JSON object per line")
        yield number, row


def _csv_rows(name: str, text: str) -> Iterator[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if "tenant" not in header or "prompt_tokens" not in header:
        raise SimulationInputError(f"{name}:1: the CSV header must name at least the columns "
                                   f"tenant and prompt_tokens (known: {', '.join(COLUMNS)})")
    reader.fieldnames = header
    for row in reader:
        if None in row:
            raise SimulationInputError(f"{name}:{reader.line_num}: more cells than header columns")
        cells: dict[str, object] = {k: v.strip() for k, v in row.items()
                                    if v is not None and v.strip() != ""}
        if cells:
            yield reader.line_num, cells


def _request(name: str, line: int, row: Mapping[str, object]) -> SimRequest:
    where = f"{name}:{line}"
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise SimulationInputError(f"{where}: unknown column {unknown[0]!r}; expected: "
                                   f"{', '.join(COLUMNS)}")
    row = {k: v for k, v in row.items() if v is not None and v != ""}
    tenant = row.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise SimulationInputError(f"{where}: 'tenant' is required (a tenant of the policy)")
    if "prompt_tokens" not in row:
        raise SimulationInputError(f"{where}: 'prompt_tokens' is required")
    model = row.get("model")
    if model is not None and not isinstance(model, str):
        raise SimulationInputError(f"{where}: 'model' must be a tier or model name")
    return SimRequest(
        line, tenant,
        _whole(where, "prompt_tokens", row["prompt_tokens"], 0),
        _count(where, row, "max_tokens", 1),
        model,
        _count(where, row, "completion_tokens", 0),
        _time(where, row.get("time")))


def _count(where: str, row: Mapping[str, object], key: str, least: int) -> int | None:
    value = row.get(key)
    return None if value is None else _whole(where, key, value, least)


def _whole(where: str, key: str, given: object, least: int) -> int:
    value = given
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            value = None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise SimulationInputError(f"{where}: '{key}' must be a whole number >= {least}, "
                                   f"not {given!r}")
    return value


def _time(where: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise SimulationInputError(
                    f"{where}: 'time' must be Unix seconds or an ISO-8601 date and time, "
                    f"not {value!r}") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            seconds = moment.timestamp()
    else:
        raise SimulationInputError(f"{where}: 'time' must be Unix seconds or ISO-8601")
    if not math.isfinite(seconds) or seconds < 0:
        raise SimulationInputError(f"{where}: 'time' must be a time after 1970, not {value!r}")
    return seconds


# -- replaying ----------------------------------------------------------------------------


class _ReplayLedger(EmbeddedLedger):
    """The embedded ledger on the simulation's clock; remembers the refusals it answers."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.now = time.time()
        self.refusals: list[Reservation] = []

    async def reserve(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                      ttl_s: float, now: float | None = None) -> Reservation:
        reservation = await super().reserve(tenant, request_id, joules, limits, ttl_s,
                                            self.now if now is None else now)
        if not reservation.ok:
            self.refusals.append(reservation)
        return reservation

    async def status(self, tenant: str, limits: list[Limit],
                     now: float | None = None) -> list[WindowState]:
        return await super().status(tenant, limits, self.now if now is None else now)

    async def grant(self, tenant: str, window: str, joules: float,
                    now: float | None = None) -> None:
        await super().grant(tenant, window, joules, self.now if now is None else now)

    async def reset(self, tenant: str, windows: list[str], now: float | None = None) -> None:
        await super().reset(tenant, windows, self.now if now is None else now)

    async def expire(self, now: float | None = None) -> int:
        return await super().expire(self.now if now is None else now)


def simulate(policy: Policy, requests: list[SimRequest], now: float | None = None,
             source: str = "requests") -> SimulationReport:
    """Replay ``requests`` in order against ``policy``'s budgets (see the module docstring).
    ``now``: the clock of requests without a ``time`` before the first that has one (default:
    the current time). Raises :class:`SimulationInputError` for a tenant not in the policy or
    a clock that goes backwards."""
    last: float | None = None
    for req in requests:
        if req.tenant not in policy.tenants:
            raise SimulationInputError(f"{source}:{req.line}: no tenant '{req.tenant}' in the "
                                       f"policy (tenants: {', '.join(policy.tenants)})")
        if req.time is not None:
            if last is not None and req.time < last:
                raise SimulationInputError(f"{source}:{req.line}: 'time' goes backwards; the "
                                           "requests must be in the order they arrive")
            last = req.time
    return asyncio.run(_replay(policy, requests, time.time() if now is None else now))


async def _replay(policy: Policy, requests: list[SimRequest], now: float) -> SimulationReport:
    calibration = Calibration()
    for tier in policy.ordered_tiers():
        calibration.seed(tier.name, tier.joules_per_prompt_token, tier.joules_per_output_token)
    with tempfile.TemporaryDirectory(prefix="joulegate-simulate-") as folder:
        ledger = _ReplayLedger(Path(folder) / "ledger.sqlite")
        guard = BudgetGuard(ledger, policy.ledger.reservation_ttl_s, fail_open=False,
                            metrics=Metrics(), calibration=calibration)
        try:
            outcomes: list[RequestOutcome] = []
            tenants: dict[str, TenantSummary] = {}
            clock = start = requests[0].time if requests[0].time is not None else now
            for index, req in enumerate(requests, 1):
                clock = req.time if req.time is not None else clock
                ledger.now = clock
                outcome = await _one(policy, guard, ledger, index, req, clock)
                outcomes.append(outcome)
                _count_outcome(tenants.setdefault(req.tenant, TenantSummary(req.tenant)), outcome)
            for name, summary in tenants.items():
                spec = policy.tenants[name]
                if spec.budgets:
                    summary.windows = await ledger.status(name, BudgetGuard.limits(spec), clock)
            return SimulationReport(start, clock, tenants, outcomes)
        finally:
            await guard.close()  # closes the ledger


async def _one(policy: Policy, guard: BudgetGuard, ledger: _ReplayLedger, index: int,
               req: SimRequest, clock: float) -> RequestOutcome:
    spec = policy.tenants[req.tenant]
    outcome = RequestOutcome(index, req.line, req.tenant, clock, None, "refused")
    allowed = policy.tenant_tiers(req.tenant)
    try:
        tier = resolve_model(allowed, spec.default_tier if req.model in (None, AUTO_MODEL)
                             else req.model)
    except RouteRefusal:
        outcome.reason = "model_not_found"
        return outcome
    plan = TierPlan.build(Decision(tier, "pinned"), allowed, RoutingSpec(fallback="off"),
                          degrade_ladder(spec, allowed))
    outcome.requested_tier = tier.name
    request_id = f"simulate-{index}"
    generation = GenerationRequest(model=tier.model, prompt="", max_tokens=req.max_tokens,
                                   request_id=request_id)
    ledger.refusals = []
    try:
        admission = await guard.admit(spec, req.tenant, plan, request_id, generation,
                                      req.prompt_tokens)
    except APIError as exc:
        outcome.reason = _REASONS.get(exc.code or "", exc.code or type(exc).__name__)
        if ledger.refusals:
            first = ledger.refusals[0]  # on the tier asked for
            outcome.predicted_joules = first.joules
            outcome.short_windows = [w.window for w in first.windows if w.remaining < first.joules]
        return outcome
    served = plan.tier
    cap = admission.max_tokens or spec.default_max_tokens
    completion = cap if req.completion_tokens is None else req.completion_tokens
    if admission.max_tokens is not None:
        completion = min(completion, admission.max_tokens)
    joules = (req.prompt_tokens * served.joules_per_prompt_token
              + completion * served.joules_per_output_token)
    await guard.settle(spec, req.tenant, request_id, admission, joules)
    outcome.outcome = "degraded" if plan.degraded_from else "served"
    outcome.tier = served.name
    outcome.max_tokens = admission.max_tokens
    outcome.completion_tokens = completion
    outcome.predicted_joules = admission.reservation.joules if admission.reservation else 0.0
    outcome.joules = joules
    outcome.warning = admission.warning
    return outcome


def _count_outcome(summary: TenantSummary, outcome: RequestOutcome) -> None:
    summary.requests += 1
    if outcome.outcome == "refused":
        assert outcome.reason is not None, "every refusal of _one names its reason"
        summary.refused += 1
        summary.refused_by[outcome.reason] = summary.refused_by.get(outcome.reason, 0) + 1
        return
    if outcome.outcome == "degraded":
        summary.degraded += 1
        move = f"{outcome.requested_tier}->{outcome.tier}"
        summary.degraded_by[move] = summary.degraded_by.get(move, 0) + 1
    else:
        summary.served += 1
    assert outcome.tier is not None, "a request that was not refused ran on a tier"
    summary.joules += outcome.joules
    summary.joules_by_tier[outcome.tier] = summary.joules_by_tier.get(outcome.tier, 0.0) \
        + outcome.joules
