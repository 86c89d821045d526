"""`joulegate budget`: tenants' joule budgets, read and changed in the policy's ledger, and
simulated against a file of requests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .common import add_policy_option, policy_state

if TYPE_CHECKING:
    from policies import Policy, TenantSpec

    from ..budgets import Ledger, WindowState
    from ..budgets.simulate import SimulationReport

T = TypeVar("T")

#: Exit status of a bad argument (unknown window, joules not positive, unreadable file).
USAGE = 2


class _Refused(Exception):
    """One line for stderr and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _budgeted_tenant(policy: Policy, tenant: str) -> TenantSpec:
    spec = policy.tenants.get(tenant)
    if spec is None:
        raise _Refused(f"no tenant '{tenant}' in the policy (tenants: {', '.join(policy.tenants)})")
    if not spec.budgets:
        raise _Refused(f"tenant '{tenant}' has no budgets")
    return spec


def _known_windows(spec: TenantSpec, tenant: str, windows: list[str]) -> None:
    known = [b.window for b in spec.budgets]
    for window in windows:
        if window not in known:
            raise _Refused(f"tenant '{tenant}' has no '{window}' budget window; its windows: "
                           f"{', '.join(known)}", USAGE)


def _with_ledger(policy: Policy, state: Path,
                 operation: Callable[[Ledger], Awaitable[T]]) -> T:
    """Run ``operation(ledger)`` on the policy's ledger (embedded file or Redis)."""
    import asyncio

    from ..budgets import LedgerUnavailable, open_ledger

    async def run() -> T:
        ledger = open_ledger(policy.ledger, state)
        try:
            return await operation(ledger)
        finally:
            await ledger.close()

    try:
        return asyncio.run(run())
    except LedgerUnavailable as exc:
        raise _Refused(f"the ledger is unavailable: {exc}") from None


def print_windows(states: Iterable[WindowState], now: float, indent: str = "") -> None:
    """The table of budget windows ``show`` prints (also after grant, reset and simulate);
    ``now``: the clock that "resets in" counts from."""
    from ..sustainability import UNIT_SYMBOL, to_unit

    print(f"{indent}{'window':15s} {'limit J':>12s} {'granted J':>10s} {'spent J':>12s} "
          f"{'reserved J':>11s} {'remaining J':>12s}  resets in")
    for s in states:
        if s.unit != "joules":  # a window in another unit: its figures in that unit
            v = [to_unit(x, s.unit) for x in (s.limit, s.granted, s.spent, s.reserved,
                                                s.remaining)]
            print(f"{indent}{s.window:15s} {v[0]:12.6g} {v[1]:10.6g} {v[2]:12.6g} "
                  f"{v[3]:11.6g} {v[4]:12.6g}  {int(s.period_end - now)} s  "
                  f"(in {UNIT_SYMBOL[s.unit]}, not J)")
            continue
        print(f"{indent}{s.window:15s} {s.limit:12.1f} {s.granted:10.1f} {s.spent:12.1f} "
              f"{s.reserved:11.1f} {s.remaining:12.1f}  {int(s.period_end - now)} s")


def _show_state(policy: Policy, state: Path, tenant: str, spec: TenantSpec) -> None:
    from ..budgets.guard import BudgetGuard

    states = _with_ledger(policy, state,
                          lambda ledger: ledger.status(tenant, BudgetGuard.limits(spec)))
    print(f"tenant {tenant} ({policy.ledger.kind} ledger)")
    print_windows(states, time.time())
    _print_footprint(state, tenant, min(s.period_start for s in states))


def _print_footprint(state: Path, tenant: str, since: float) -> None:
    """The tenant's energy, water and carbon since ``since``, from the usage log."""
    from ..usage_log import USAGE_LOG_NAME, read_usage

    records = [r for r in read_usage(state / USAGE_LOG_NAME, since) if r.get("tenant") == tenant]
    if not records:
        return
    it = sum(float(r.get("j", 0)) for r in records)
    facility = sum(float(r.get("fj", 0)) for r in records)
    water = sum(float(r.get("w", 0)) for r in records) / 1000
    co2 = sum(float(r.get("co2", 0)) for r in records)
    print(f"since {datetime.fromtimestamp(since, UTC).isoformat(timespec='seconds')}: "
          f"{len(records)} requests, {it:.1f} J IT, {facility:.1f} J facility, "
          f"{water:.4f} L water, {co2:.3f} gCO2 (see `joulegate report`)")


def _run(command: Callable[[], int]) -> int:
    try:
        return command()
    except _Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status


def cmd_budget_show(args: argparse.Namespace) -> int:
    def show() -> int:
        policy, state = policy_state(args.policy)
        spec = policy.tenants.get(args.tenant)
        if spec is not None and not spec.budgets:
            print(f"tenant '{args.tenant}' has no budgets")
            return 0
        spec = _budgeted_tenant(policy, args.tenant)
        _show_state(policy, state, args.tenant, spec)
        return 0

    return _run(show)


def cmd_budget_grant(args: argparse.Namespace) -> int:
    def grant() -> int:
        policy, state = policy_state(args.policy)
        spec = _budgeted_tenant(policy, args.tenant)
        _known_windows(spec, args.tenant, [args.window])
        if not args.joules > 0 or args.joules == float("inf"):
            raise _Refused(f"--joules must be a positive number, not {args.joules:g}", USAGE)
        _with_ledger(policy, state,
                     lambda ledger: ledger.grant(args.tenant, args.window, args.joules))
        print(f"granted {args.joules:g} J to tenant {args.tenant} in its current "
              f"{args.window} period")
        _show_state(policy, state, args.tenant, spec)
        return 0

    return _run(grant)


def cmd_budget_reset(args: argparse.Namespace) -> int:
    def reset() -> int:
        policy, state = policy_state(args.policy)
        spec = _budgeted_tenant(policy, args.tenant)
        windows = list(dict.fromkeys(args.window)) if args.window else \
            [b.window for b in spec.budgets]
        _known_windows(spec, args.tenant, windows)  # all checked before anything is reset
        _with_ledger(policy, state, lambda ledger: ledger.reset(args.tenant, windows))
        print(f"reset the current period's spend and grants of tenant {args.tenant} in: "
              f"{', '.join(windows)}")
        _show_state(policy, state, args.tenant, spec)
        return 0

    return _run(reset)


def cmd_budget_simulate(args: argparse.Namespace) -> int:
    from ..budgets.simulate import SimulationInputError, read_requests, simulate

    def run() -> int:
        policy, _ = policy_state(args.policy)
        try:
            source = "<stdin>" if args.file == "-" else args.file
            requests = read_requests(source, sys.stdin.read() if args.file == "-" else None)
            report = simulate(policy, requests, source=source)
        except SimulationInputError as exc:
            raise _Refused(str(exc), USAGE) from None
        if args.json:
            print(json.dumps(_report_json(report), indent=1))
        else:
            _print_report(report, source)
        return 0

    return _run(run)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in counts.items())


def _print_report(report: SimulationReport, source: str) -> None:
    total = len(report.requests)
    span = _iso(report.start) if report.start == report.end else \
        f"{_iso(report.start)} .. {_iso(report.end)}"
    print(f"simulated {total} request{'s' * (total != 1)} from {source} ({span}); priced "
          "with the tiers' calibration seeds, no model run")
    print(f"{'tenant':20s} {'requests':>8s} {'served':>7s} {'degraded':>9s} {'refused':>8s} "
          f"{'joules':>12s}")
    rows = list(report.tenants.values())
    for t in rows:
        print(f"{t.tenant:20s} {t.requests:8d} {t.served:7d} {t.degraded:9d} {t.refused:8d} "
              f"{t.joules:12.1f}")
    print(f"{'total':20s} {total:8d} {sum(t.served for t in rows):7d} "
          f"{sum(t.degraded for t in rows):9d} {sum(t.refused for t in rows):8d} "
          f"{report.joules:12.1f}")
    print("(served: on the tier asked for; degraded: on a cheaper tier)")
    for t in rows:
        print()
        print(f"tenant {t.tenant}")
        if t.degraded_by:
            print(f"  degraded: {_counts(t.degraded_by)}")
        if t.refused_by:
            print(f"  refused: {_counts(t.refused_by)}")
        if t.joules_by_tier:
            print("  joules by tier: " + ", ".join(f"{tier} {j:.1f}"
                                                   for tier, j in t.joules_by_tier.items()))
        if t.windows:
            print("  budget at the end:")
            print_windows(t.windows, report.end, indent="  ")
        else:
            print("  no budgets")


def _report_json(report: SimulationReport) -> dict[str, Any]:
    def windows(states: Iterable[WindowState]) -> list[dict[str, Any]]:
        return [{"window": s.window, "period_start": s.period_start, "period_end": s.period_end,
                 "limit_joules": s.limit, "granted_joules": s.granted, "spent_joules": s.spent,
                 "reserved_joules": s.reserved, "remaining_joules": s.remaining}
                for s in states]

    rows = list(report.tenants.values())
    return {
        "start": report.start, "end": report.end,
        "totals": {"requests": len(report.requests), "served": sum(t.served for t in rows),
                   "degraded": sum(t.degraded for t in rows),
                   "refused": sum(t.refused for t in rows), "joules": report.joules},
        "tenants": {t.tenant: {"requests": t.requests, "served": t.served,
                               "degraded": t.degraded, "degraded_by": t.degraded_by,
                               "refused": t.refused, "refused_by": t.refused_by,
                               "joules": t.joules, "joules_by_tier": t.joules_by_tier,
                               "windows": windows(t.windows)} for t in rows},
        "requests": [{"index": r.index, "line": r.line, "tenant": r.tenant, "time": r.time,
                      "requested_tier": r.requested_tier, "outcome": r.outcome, "tier": r.tier,
                      "max_tokens": r.max_tokens, "completion_tokens": r.completion_tokens,
                      "predicted_joules": r.predicted_joules, "joules": r.joules,
                      "reason": r.reason, "short_windows": r.short_windows,
                      "warning": r.warning} for r in report.requests],
    }


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    budget = sub.add_parser("budget", help="show, change and simulate tenants' joule budgets",
                            description="Show and change tenants' joule budgets in the "
                                        "policy's ledger (embedded SQLite file or Redis), and "
                                        "simulate a file of requests against them.")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True, metavar="COMMAND")

    bshow = budget_sub.add_parser("show", help="spent, reserved and remaining joules per window")
    bshow.add_argument("tenant")
    add_policy_option(bshow)
    bshow.set_defaults(func=cmd_budget_show)

    bgrant = budget_sub.add_parser(
        "grant", help="add joules to a tenant's current period of one window",
        description="Add joules to the tenant's current period of one budget window (they "
                    "lapse when the period ends), then show its budget.")
    bgrant.add_argument("tenant")
    bgrant.add_argument("--window", required=True, metavar="W",
                        help="one of the tenant's budget windows, e.g. 1h")
    bgrant.add_argument("--joules", required=True, type=float, metavar="J",
                        help="joules to add (positive)")
    add_policy_option(bgrant)
    bgrant.set_defaults(func=cmd_budget_grant)

    breset = budget_sub.add_parser(
        "reset", help="forget a tenant's spend and grants in the current period",
        description="Forget the spend and grants of the tenant's current period in the given "
                    "windows (default: all its windows), then show its budget. Requests in "
                    "flight keep their reservations.")
    breset.add_argument("tenant")
    breset.add_argument("--window", action="append", metavar="W",
                        help="a budget window to reset (repeatable; default: all of them)")
    add_policy_option(breset)
    breset.set_defaults(func=cmd_budget_reset)

    bsim = budget_sub.add_parser(
        "simulate", help="replay a file of requests against the policy's budgets",
        description="Replay requests (JSONL, one object a line, or CSV with a header row; "
                    "columns: tenant, prompt_tokens, and optionally max_tokens, model, "
                    "completion_tokens, time) in order through the gateway's budget admission, "
                    "on a throwaway ledger, priced with the tiers' calibration seeds. Prints "
                    "what would be served, degraded or refused and the joules spent per "
                    "tenant. No model is loaded and the policy's ledger is not touched.")
    bsim.add_argument("file", metavar="FILE", help="the requests (.jsonl or .csv; - for stdin)")
    add_policy_option(bsim)
    bsim.add_argument("--json", action="store_true",
                      help="one JSON object: totals, per tenant, and every request's outcome")
    bsim.set_defaults(func=cmd_budget_simulate)
