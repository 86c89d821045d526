#!/usr/bin/env python3
"""How far two label files of the same prompts agree, and how much a router could learn.

Two runs of ``joulegate router collect`` on the same dataset that differ in one thing (here:
the cheap tier's quantization, IQ4_NL against Q4_K_M, the strong tier's outcomes kept with
``--keep-strong``) say how stable "this prompt needs the strong tier" is. The second file's
outcomes are routed by the first's, as if a router knew the first run exactly: that APGR is
what any prompt-only estimator could hope for when the labels move this much with a change
the user cannot see.

    .venv/bin/python benchmarks/label_agreement.py A.csv B.csv [--names A,B]

Prints the table and writes it to ``benchmarks/results/label-agreement-<time>.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from publish import publish

from gateway.routing.labels import Example, read_label_file
from gateway.routing.lodo import apgr_of


def kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's kappa of two 0/1 label lists (1: perfect, 0: chance agreement)."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def compare(a: list[Example], b: list[Example], names: tuple[str, str]) -> str:
    by_prompt = {e.prompt: e for e in a}
    pairs = [(by_prompt[e.prompt], e) for e in b if e.prompt in by_prompt]
    if not pairs:
        sys.exit("the two files share no prompt")
    olds, news = [p[0] for p in pairs], [p[1] for p in pairs]
    n = len(pairs)

    def row(what: str, get: Callable[[Example], bool]) -> str:
        xa, xb = [get(e) for e in olds], [get(e) for e in news]
        agree = sum(x == y for x, y in zip(xa, xb, strict=True))
        return (f"| {what} | {sum(xa)} | {sum(xb)} | {agree}/{n} ({agree / n:.1%}) "
                f"| {kappa(xa, xb):.3f} |")

    def need(e: Example) -> bool:
        return e.strong and not e.weak

    lines = [
        f"# Label agreement: {names[0]} against {names[1]}",
        "",
        f"{n} prompts in both files.",
        "",
        f"| outcome | {names[0]} | {names[1]} | same | Cohen's kappa |",
        "|---|---|---|---|---|",
        row("cheap tier right", lambda e: e.weak),
        row("strong tier right", lambda e: e.strong),
        row("needs the strong tier (strong right, cheap wrong)", need),
        "",
        *(["The strong tier's outcomes and joules are the same in both files: one run's, "
           "copied (`router collect --keep-strong`), so its row agrees by construction.", ""]
          if all(o.strong == m.strong and o.strong_joules == m.strong_joules
                 for o, m in pairs) else []),
        f"Routing {names[1]}'s outcomes hardest first by {names[0]}'s (a tie at its expected "
        "order):",
        "",
        "| ranked by | APGR |",
        "|---|---|",
        f"| {names[0]}: strong right minus cheap right (1, 0, -1) | "
        f"{apgr_of([e.gain for e in olds], news):.3f} |",
        f"| {names[0]}: cheap tier wrong | "
        f"{apgr_of([float(not e.weak) for e in olds], news):.3f} |",
        f"| {names[1]} itself (oracle) | {apgr_of([e.gain for e in news], news):.3f} |",
    ]
    ja = [e.weak_joules for e in olds if e.weak_joules]
    jb = [e.weak_joules for e in news if e.weak_joules]
    if ja and jb:
        lines += ["", f"Cheap tier's mean joules: {names[0]} {sum(ja) / len(ja):.1f} J, "
                      f"{names[1]} {sum(jb) / len(jb):.1f} J."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", default="A,B", help="what to call the two files")
    args = parser.parse_args()
    first, second = (s.strip() for s in args.names.split(",", 1))
    publish(compare(read_label_file(args.a), read_label_file(args.b), (first, second)),
            "label-agreement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
