"""What several commands share: the policy they act on and its state folder."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from policies import DEFAULT_POLICY_PATH, Policy, PolicyError, load_policy


def add_policy_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE",
                        help="policy YAML file (default: the embedded default policy)")


def policy_state(policy_file: str | None) -> tuple[Policy, Path]:
    """The policy (default: the embedded one) and its state folder; exits 2 if invalid."""
    from ..runtime import state_dir

    try:
        policy = load_policy(policy_file or DEFAULT_POLICY_PATH)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    return policy, state_dir(policy)


def new_key(prefix: str = "sk-jg-") -> str:
    """A new random API key."""
    return prefix + secrets.token_urlsafe(24)
