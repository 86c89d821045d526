#!/usr/bin/env python3
"""Label benchmark of the difficulty routers (the same as `joulegate router eval`).

RouteLLM's metrics on ``data/routing/mmlu`` (in the checkout), subjects split into folds so
that every prompt is scored by a `learned` model fitted on other subjects only; contaminated
prompts excluded.
Prints the APGR / CPT(50%) / CPT(80%) table for random, length-only, heuristic and learned,
and writes it with a quality-vs-strong-fraction PNG to ``benchmarks/results/``.

    .venv/bin/python benchmarks/router_eval.py [--data DIR]   # default: data/routing
"""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.cli import main

if __name__ == "__main__":
    out = str(Path(__file__).resolve().parent / "results")
    sys.exit(main(["router", "eval", "--out-dir", out, *sys.argv[1:]]))
