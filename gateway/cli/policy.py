"""`joulegate check-policy` and `joulegate keys`: write and check policy files."""

from __future__ import annotations

import argparse
import getpass
import sys

from policies import inspect_policy, key_digest

from .common import new_key


def cmd_check_policy(args: argparse.Namespace) -> int:
    from ..preflight import CHECKS, missing_extras

    report = inspect_policy(args.file, CHECKS)
    if report.issues:
        print(report.error(), file=sys.stderr)
    extras = missing_extras(report.data) if isinstance(report.data, dict) else []
    for line in extras:
        print(f"{args.file}: {line}", file=sys.stderr)
    if report.issues or extras:
        return 1
    policy = report.policy
    assert policy is not None
    tiers = ", ".join(f"{t.name} ({t.model} on {t.backend})" for t in policy.ordered_tiers())
    print(f"{args.file}: ok\n  tiers: {tiers}\n  tenants: {', '.join(policy.tenants)}")
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    if args.key == "-":
        key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("key: ")
        print(f"sha256:{key_digest(key)}")
    elif args.key:
        print(f"sha256:{key_digest(args.key)}")
    else:
        key = new_key()
        print(f"key:    {key}\npolicy: sha256:{key_digest(key)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check-policy", help="check a policy file without serving it",
        description="Check a policy file without serving it: every mistake is reported at "
                    "once, as FILE:LINE:COLUMN: key path: what was expected (with a "
                    "did-you-mean for misspelt names), and so is every backend whose Python "
                    "package is not installed, with the pip command that installs it. Exit "
                    "status 1 if there is anything to fix.")
    check.add_argument("file", help="the policy YAML file")
    check.set_defaults(func=cmd_check_policy)

    keys = sub.add_parser("keys", help="make API keys and their policy form",
                          description="Make API keys. Policies store only a key's sha256 digest.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    khash = keys_sub.add_parser(
        "hash", help="print a key's policy form (a new random key if none is given)",
        description="Print the 'sha256:...' form of a key to paste into a policy. With no "
                    "argument a new random key is made and both forms are printed.")
    khash.add_argument("key", nargs="?", help="the key, or - to read it from standard input")
    khash.set_defaults(func=cmd_keys_hash)
