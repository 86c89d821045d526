"""`joulegate check-policy` and `joulegate keys`: write and check policy files."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from backends.models import CATALOG
from policies import PolicyError, key_digest, load_policy

from ..runtime import index_keys
from .common import new_key


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
        index_keys(policy, args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    from ..routing import ESTIMATORS

    problems = []
    for name, spec in policy.backends.items():
        if spec.kind == "llamacpp" and spec.model not in CATALOG \
                and not Path(spec.model).expanduser().is_file():
            problems.append(f"  backends.{name}.model: '{spec.model}' is neither a catalog model "
                            f"({', '.join(CATALOG)}) nor an existing file")
    for where, routing in [("routing", policy.routing), *((f"tenants.{t}.routing", s.routing)
                                                          for t, s in policy.tenants.items())]:
        if routing is not None and routing.estimator and routing.estimator not in ESTIMATORS:
            problems.append(f"  {where}.estimator: unknown difficulty estimator "
                            f"'{routing.estimator}'; expected one of: {', '.join(sorted(ESTIMATORS))}")
    if problems:
        print(f"invalid policy {args.file}:", *problems, sep="\n", file=sys.stderr)
        return 1
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


def register(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "check-policy", help="check a policy file without serving it",
        description="Check a policy file without serving it: every mistake is reported at "
                    "once, with its line, key path and what was expected. Exit status 1 if "
                    "the file has mistakes.")
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
