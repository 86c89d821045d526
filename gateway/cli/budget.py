"""`joulegate budget`: tenants' joule budgets, read and changed in the policy's ledger."""

from __future__ import annotations

import argparse
import sys
import time

from .common import add_policy_option, policy_state


def cmd_budget_show(args: argparse.Namespace) -> int:
    import asyncio

    from ..budgets import LedgerUnavailable, open_ledger
    from ..budgets.guard import BudgetGuard

    policy, state = policy_state(args.policy)
    spec = policy.tenants.get(args.tenant)
    if spec is None:
        print(f"no tenant '{args.tenant}' in the policy", file=sys.stderr)
        return 1
    if not spec.budgets:
        print(f"tenant '{args.tenant}' has no budgets")
        return 0

    async def show() -> list:
        ledger = open_ledger(policy.ledger, state)
        try:
            return await ledger.status(args.tenant, BudgetGuard.limits(spec))
        finally:
            await ledger.close()

    try:
        states = asyncio.run(show())
    except LedgerUnavailable as exc:
        print(f"the ledger is unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"tenant {args.tenant} ({policy.ledger.kind} ledger)")
    print(f"{'window':15s} {'limit J':>12s} {'granted J':>10s} {'spent J':>12s} {'reserved J':>11s} "
          f"{'remaining J':>12s}  resets in")
    now = time.time()
    for s in states:
        print(f"{s.window:15s} {s.limit:12.1f} {s.granted:10.1f} {s.spent:12.1f} {s.reserved:11.1f} "
              f"{s.remaining:12.1f}  {int(s.period_end - now)} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    budget = sub.add_parser("budget", help="show and change tenants' joule budgets",
                            description="Show and change tenants' joule budgets in the "
                                        "policy's ledger (embedded SQLite file or Redis).")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True, metavar="COMMAND")
    bshow = budget_sub.add_parser("show", help="spent, reserved and remaining joules per window")
    bshow.add_argument("tenant")
    add_policy_option(bshow)
    bshow.set_defaults(func=cmd_budget_show)
