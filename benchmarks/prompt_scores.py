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

With ``--wordings`` the same prompts are scored as asked in the other wordings of
:data:`gateway.routing.labels.FORMATS` (a prompt's own is the file above), for the wording
spread of the ``cascade-prompt`` rows; they go to
``data/routing/prompt-scores-small-wordings.csv`` (``key,wording,mean_logprob``). A request
already scored (the same text in the same wording: a HumanEval problem labelled in chat
asked as a completion is the completion file's prompt) is not scored again.

    .venv/bin/python benchmarks/prompt_scores.py --wordings --per-subject 4
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
    FORMATS,
    PROMPT_SCORES,
    WORDED_SCORES,
    Example,
    load_sources,
    read_prompt_scores,
    read_worded_scores,
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


async def score(todo: list[tuple[Example, str | None]], out: Path, header: list[str],
                known: dict[tuple[str, str], float]) -> None:
    """Score each (example, wording) of ``todo`` (``None``: as labelled) and append its row
    to ``out``; ``known``: (prompt, wording) → a score already measured, reused."""
    from tqdm import tqdm

    backend = LlamaCppBackend("small", LlamaCppSettings(model=MODEL, n_ctx=4096, slots=1))
    await backend.start()
    tokens = CascadeSpec().prompt_tokens
    try:
        with out.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if fh.tell() == 0:
                writer.writerow(header)
            for e, wording in tqdm(todo, desc="prompt scores", unit="prompt",
                                   file=sys.stdout, mininterval=10):
                asked = (e.prompt, wording or e.format)
                mean = known.get(asked)
                if mean is None:
                    req = request_for(e, wording)
                    req.max_tokens, req.temperature, req.prompt_logprobs = 1, 0.0, tokens
                    answer = await backend.complete(req)
                    text = RequestText.of(req).last
                    mean = known[asked] = math.log(
                        prompt_confidence(answer.prompt_logprobs or [], text))
                writer.writerow([e.key, f"{mean:.4f}"] if wording is None
                                else [e.key, wording, f"{mean:.4f}"])
                fh.flush()
    finally:
        await backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "routing")
    parser.add_argument("--per-subject", type=int, default=32)
    parser.add_argument("--wordings", action="store_true",
                        help="score the prompts in the other wordings instead (see above)")
    args = parser.parse_args()
    examples = chosen(load_sources(args.data), args.per_subject)
    # Every score measured so far, by what was asked: (prompt, wording).
    known = {(e.prompt, e.format): e.prompt_logprob for e in examples
             if e.prompt_logprob is not None}
    if args.wordings:
        out, header = args.data / WORDED_SCORES, ["key", "wording", "mean_logprob"]
        worded = read_worded_scores(out)
        by_key = {e.key: e for e in examples}
        known.update({(by_key[k].prompt, w): v for (k, w), v in worded.items() if k in by_key})
        todo: list[tuple[Example, str | None]] = [
            (e, w) for e in examples for w in FORMATS
            if w != e.format and (e.key, w) not in worded]
    else:
        out, header = args.data / PROMPT_SCORES, ["key", "mean_logprob"]
        done = set(read_prompt_scores(out))
        # One row per key: a question asked twice (MMLU repeats a few) is scored once.
        todo = list({e.key: (e, None) for e in examples if e.key not in done}.values())
    print(f"{len(todo)} to score ({len({(e.prompt, w or e.format) for e, w in todo} - set(known))}"
          " requests not measured yet)")
    asyncio.run(score(todo, out, header, known))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
