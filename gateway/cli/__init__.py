"""The ``joulegate`` command: one module per group of subcommands, each with ``register``.

    joulegate serve [--policy FILE] [--host H] [--port P] [--workers N] [--log-format F]
    joulegate check-policy FILE
    joulegate keys hash [KEY | -]
    joulegate models [--assemble]
    joulegate energy [--policy FILE]
    joulegate budget show|grant|reset|simulate ...
    joulegate route PROMPT [--policy FILE] [--tenant T] [--estimator NAME] [--json]
    joulegate router train|eval
    joulegate import-litellm CONFIG [-o FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from . import budget, litellm, models, policy, report, route, serve

#: Subcommand modules, in the order `joulegate --help` lists them.
COMMANDS = (serve, policy, models, budget, report, route, litellm)


def version() -> str:
    try:
        return metadata.version("joulegate")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joulegate",
        description="An OpenAI-compatible LLM gateway that routes each request to the cheapest "
                    "capable model tier inside per-tenant joule budgets.",
        epilog="Run `joulegate COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"joulegate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`joulegate ... | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
