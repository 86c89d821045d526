#!/usr/bin/env python3
"""How likely the cheap tier finds each labelled prompt's own text: the cascade's
``signal: prompt``, measured for ``joulegate router eval`` (its ``cascade-prompt`` row).

Every labelled prompt of ``data/routing`` (a seeded sample of ``--per-subject`` prompts per
MMLU subject: scoring all 11,000 would take hours on 2 cores) is sent, in the wording it was
labelled in, through the llama.cpp backend of the default policy's ``small`` tier
(Qwen2.5-Coder-0.5B), with ``prompt_logprobs`` on and ``max_tokens`` 1: the gateway's own
path. The mean log-probability of the request's own text among the scored tokens
(:func:`gateway.routing.estimators.prompt_confidence`) goes to
``data/routing/prompt-scores-small.csv`` (``key,mean_logprob``; keys are
:attr:`gateway.routing.labels.Example.key`). Rows already there are kept, so an interrupted
run resumes.

    .venv/bin/python benchmarks/prompt_scores.py [--per-subject 32] [--data DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppBackend, LlamaCppSettings  # noqa: E402
from gateway.routing.estimators import prompt_confidence  # noqa: E402
from gateway.routing.features import RequestText  # noqa: E402
from gateway.routing.labels import (  # noqa: E402
    PROMPT_SCORES,
    Example,
    load_sources,
    read_prompt_scores,
    request_for,
)
from policies import CascadeSpec  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def chosen(sources: dict[str, list[Example]], per_subject: int) -> list[Example]:
    """Every labelled prompt, MMLU's sampled per subject (seeded: the same on every run)."""
    out: list[Example] = []
    for name, rows in sources.items():
        if name != "mmlu":
            out.extend(rows)
            continue
        subjects: dict[str, list[Example]] = {}
        for e in rows:
            subjects.setdefault(e.subject, []).append(e)
        for subject in sorted(subjects):
            # A seeded order per subject, so that a larger sample extends a smaller one.
            order = subjects[subject][:]
            random.Random(subject).shuffle(order)
            out.extend(order[:per_subject])
    return out


async def score(examples: list[Example], out: Path, done: set[str]) -> None:
    from tqdm import tqdm

    backend = LlamaCppBackend("small", LlamaCppSettings(model=MODEL, n_ctx=4096, slots=1))
    await backend.start()
    tokens = CascadeSpec().prompt_tokens
    try:
        with out.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if fh.tell() == 0:
                writer.writerow(["key", "mean_logprob"])
            for e in tqdm([e for e in examples if e.key not in done], desc="prompt scores",
                          unit="prompt", file=sys.stdout, mininterval=10):
                req = request_for(e)
                req.max_tokens, req.temperature, req.prompt_logprobs = 1, 0.0, tokens
                answer = await backend.complete(req)
                text = RequestText.of(req).last
                mean = math.log(prompt_confidence(answer.prompt_logprobs or [], text))
                writer.writerow([e.key, f"{mean:.4f}"])
                fh.flush()
                done.add(e.key)
    finally:
        await backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "routing")
    parser.add_argument("--per-subject", type=int, default=32)
    args = parser.parse_args()
    out = args.data / PROMPT_SCORES
    examples = chosen(load_sources(args.data), args.per_subject)
    done = set(read_prompt_scores(out))
    print(f"{len(examples)} prompts, {len(done & {e.key for e in examples})} already scored")
    asyncio.run(score(examples, out, done))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
