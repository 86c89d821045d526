#!/usr/bin/env python3
"""Cascade vs one-shot routing on joules per quality, from labels of our own tiers.

Input: label CSVs written by ``joulegate router collect`` (default: every
``data/routing/*/labels-*.csv`` whose rows carry ``cheap_logprobs``): per prompt, whether the
cheap and the strong tier answered right, what each answer cost in joules, and the
log-probabilities of the cheap answer's first tokens and its token counts.

Routers compared, each as (quality = share of prompts answered right, total joules):

- ``always-cheap`` / ``always-strong`` (the anchor: 95% of its quality is the target);
- ``random``: the straight line between the two (its expectation at each strong share);
- one-shot estimators (``heuristic``, ``learned``, ``semantic``, whichever load): the request
  as sent scored up front, at or above the threshold to the strong tier;
- ``cascade``: every prompt starts on the cheap tier; its first ``K`` tokens' confidence
  (``exp(mean log-probability)``, as :mod:`gateway.cascade` computes it) below the threshold
  drops that answer and asks the strong tier, paying the probe *and* the strong answer. The
  probe's joules are the cheap answer's joules scaled to the tokens it had made by then (prompt
  tokens weighted by the tier's joules_per_prompt_token / joules_per_output_token seeds).
- ``oracle``: the strong tier only where the cheap one is wrong and the strong one right.

No threshold is tuned on the prompts it is reported on: the prompts are split in two halves
(alternate rows of each source); each router's threshold is chosen on one half as the
cheapest that keeps 95% of always-strong's quality there, and reported on the other half,
then the halves swap; the table gives the sum of both reported halves. The full sweep over
every threshold is plotted as a curve (PNG) for the shape, not for choosing.

    .venv/bin/python benchmarks/cascade.py [--labels FILE ...] [--probe-tokens 8]

Writes ``benchmarks/results/cascade-<stamp>.md`` and ``.png``; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.cli.router_collect import MCQ_INSTRUCTION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data" / "routing"

#: The default policy's small tier: joules per prompt token over joules per output token.
PROMPT_WEIGHT = 0.1 / 1.1
#: The system prompts `router collect` asks with, by source (what one-shot routing scores).
SYSTEM = {"mmlu": MCQ_INSTRUCTION}


@dataclass(frozen=True, slots=True)
class Row:
    prompt: str
    source: str
    cheap_ok: bool
    strong_ok: bool
    cheap_j: float
    strong_j: float
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[float, ...]
    #: How the tiers were asked (``bare``, or ``chat`` / ``completion`` for HumanEval).
    format: str = "bare"

    def confidence(self, k: int) -> float:
        first = self.logprobs[:k]
        return math.exp(sum(first) / len(first)) if first else 1.0

    def probe_joules(self, k: int) -> float:
        """The cheap answer's joules up to its ``k``-th token (all of it when shorter)."""
        made = min(k, self.completion_tokens)
        whole = PROMPT_WEIGHT * self.prompt_tokens + self.completion_tokens
        return self.cheap_j * (PROMPT_WEIGHT * self.prompt_tokens + made) / whole if whole else 0.0


def load(paths: list[Path]) -> list[Row]:
    out = []
    for path in paths:
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if not r.get("cheap_logprobs"):
                    continue
                out.append(Row(r["prompt"], r.get("source") or path.parent.name,
                               r["cheap_ok"] == "1", r["strong_ok"] == "1",
                               float(r["cheap_joules"]), float(r["strong_joules"]),
                               int(r["cheap_prompt_tokens"]), int(r["cheap_completion_tokens"]),
                               tuple(float(x) for x in r["cheap_logprobs"].split()),
                               r.get("format") or "bare"))
    return out


# -- routers: each maps a threshold to which prompts go strong, and what that costs -----------

def one_shot_point(rows: list[Row], scores: list[float], threshold: float) -> tuple[int, float]:
    right, joules = 0, 0.0
    for row, s in zip(rows, scores, strict=True):
        strong = s >= threshold
        right += row.strong_ok if strong else row.cheap_ok
        joules += row.strong_j if strong else row.cheap_j
    return right, joules


def cascade_point(rows: list[Row], k: int, threshold: float) -> tuple[int, float]:
    right, joules = 0, 0.0
    for row in rows:
        if row.confidence(k) >= threshold:
            right += row.cheap_ok
            joules += row.cheap_j
        else:
            right += row.strong_ok
            joules += row.probe_joules(k) + row.strong_j
    return right, joules


def estimator_scores(name: str, rows: list[Row]) -> list[float] | None:
    from backends import GenerationRequest
    from gateway.routing import create_estimator

    try:
        estimator = create_estimator(name)
    except (ValueError, ImportError, OSError) as exc:  # its extra or model file is missing
        print(f"estimator {name} left out: {exc}", file=sys.stderr)
        return None
    from gateway.routing.labels import Example, request_for

    out = []
    for row in rows:
        if row.format != "bare":  # asked as a chat or completion request: score that request
            request = request_for(Example("", row.prompt, row.cheap_ok, row.strong_ok,
                                          row.source, row.format))
        else:
            system = SYSTEM.get(row.source)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": row.prompt}]
            request = GenerationRequest(model="auto", messages=messages)
        out.append(estimator.score(request).score)
    return out


def thresholds_of(values: list[float]) -> list[float]:
    """Every threshold that changes a decision: each distinct value, and one above all."""
    return [*sorted(set(values)), math.inf]


def choose(rows: list[Row], point, candidates: list[float], target: float) -> float:
    """The cheapest threshold whose quality on ``rows`` is at least ``target`` (share)."""
    best: tuple[float, float] | None = None
    for t in candidates:
        right, joules = point(rows, t)
        if right >= target * len(rows) - 1e-9 and (best is None or joules < best[0]):
            best = (joules, t)
    return best[1] if best is not None else -math.inf  # nothing reaches it: all strong


def halves(rows: list[Row]) -> tuple[list[int], list[int]]:
    seen: dict[str, int] = {}
    a, b = [], []
    for i, row in enumerate(rows):
        n = seen.get(row.source, 0)
        seen[row.source] = n + 1
        (a if n % 2 == 0 else b).append(i)
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="*", type=Path,
                        default=sorted(DATA.glob("*/labels-*.csv")))
    parser.add_argument("--probe-tokens", type=int, default=8)
    parser.add_argument("--estimators", default="heuristic,learned,semantic")
    parser.add_argument("--quality", type=float, default=0.95,
                        help="share of always-strong's quality each threshold must keep")
    args = parser.parse_args(argv)
    rows = load(args.labels)
    if not rows:
        print("no labelled rows with cheap_logprobs: run `joulegate router collect` first",
              file=sys.stderr)
        return 1
    k = args.probe_tokens
    routers: dict[str, tuple[object, list[float]]] = {}
    for name in args.estimators.split(","):
        scores = estimator_scores(name, rows)
        if scores is not None:
            routers[name] = (scores, thresholds_of(scores))
    confidences = [r.confidence(k) for r in rows]
    # The cascade escalates below the threshold: candidates are the confidences and above.
    cascade_candidates = [-math.inf, *sorted(set(confidences)), math.inf]

    def point_for(name: str, subset: list[int]):
        sub = [rows[i] for i in subset]
        if name == "cascade":
            return sub, lambda rs, t: cascade_point(rs, k, t)
        scores = routers[name][0]
        sub_scores = [scores[i] for i in subset]  # type: ignore[index]
        return sub, lambda rs, t: one_shot_point(rs, sub_scores, t)

    a, b = halves(rows)
    table = []
    n = len(rows)
    cheap_right = sum(r.cheap_ok for r in rows)
    strong_right = sum(r.strong_ok for r in rows)
    cheap_j = sum(r.cheap_j for r in rows)
    strong_j = sum(r.strong_j for r in rows)
    oracle = [(not r.cheap_ok) and r.strong_ok for r in rows]
    oracle_right = sum(r.strong_ok if o else r.cheap_ok for r, o in zip(rows, oracle, strict=True))
    oracle_j = sum(r.strong_j if o else r.cheap_j for r, o in zip(rows, oracle, strict=True))
    table.append(("always-cheap", "", cheap_right, cheap_j))
    table.append(("always-strong", "", strong_right, strong_j))
    table.append(("oracle", "", oracle_right, oracle_j))
    chosen_notes = []
    for name in [*routers, "cascade"]:
        right, joules, picked = 0, 0.0, []
        for fit, report in ((a, b), (b, a)):
            fit_rows, fit_point = point_for(name, fit)
            strong_share = sum(fit_rows[i].strong_ok for i in range(len(fit_rows))) / max(len(fit_rows), 1)
            cands = cascade_candidates if name == "cascade" else routers[name][1]  # type: ignore[assignment]
            t = choose(fit_rows, fit_point, cands, args.quality * strong_share)
            rep_rows, rep_point = point_for(name, report)
            r_, j_ = rep_point(rep_rows, t)
            right += r_
            joules += j_
            picked.append(t)
        label = f"cascade (K={k})" if name == "cascade" else f"one-shot {name}"
        table.append((label, " / ".join(f"{t:.3f}" for t in picked), right, joules))
        chosen_notes.append(label)

    def random_quality_at(j: float) -> float:
        if strong_j == cheap_j:
            return strong_right / n
        x = min(max((j - cheap_j) / (strong_j - cheap_j), 0.0), 1.0)
        return (cheap_right + x * (strong_right - cheap_right)) / n

    sources = sorted({r.source for r in rows})
    counts = ", ".join(f"{s} {sum(r.source == s for r in rows)}" for s in sources)
    lines = [
        f"{n} prompts ({counts}); cheap = small (Qwen2.5-Coder-0.5B), strong = full "
        "(Qwen2.5-Coder-1.5B), Q4_K_M on llama.cpp, energy estimated from CPU time (the CPU "
        "was shared with other work while the labels were collected: joules include that "
        "contention's slowdown). Thresholds chosen on one half of the prompts and reported on "
        "the other, both ways (see the module docstring); the target is "
        f"{args.quality:.0%} of always-strong's quality.", "",
        "| router | thresholds (half A / half B) | quality | % of always-strong quality | "
        "joules | % of always-strong joules | J per right answer | vs random at same joules |",
        "|---|---|---|---|---|---|---|---|"]
    for label, thr, right, joules in table:
        q = right / n
        delta = q - random_quality_at(joules)
        lines.append(f"| {label} | {thr} | {q:.1%} | {right / max(strong_right, 1):.1%} | "
                     f"{joules:,.0f} | {joules / strong_j:.1%} | {joules / max(right, 1):,.1f} | "
                     f"{delta * 100:+.1f} pts |")
    per_source = ["", "Per source (always-cheap / always-strong / oracle quality):", ""]
    for s in sources:
        sub = [r for r in rows if r.source == s]
        per_source.append(f"- {s}: {len(sub)} prompts, cheap {sum(r.cheap_ok for r in sub) / len(sub):.1%}, "
                          f"strong {sum(r.strong_ok for r in sub) / len(sub):.1%}, "
                          f"oracle {sum((r.cheap_ok or r.strong_ok) for r in sub) / len(sub):.1%}; "
                          f"mean joules cheap {sum(r.cheap_j for r in sub) / len(sub):.1f}, "
                          f"strong {sum(r.strong_j for r in sub) / len(sub):.1f}")
    report = "\n".join(lines + per_source)
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"cascade-{stamp}.png"
    curves = {f"one-shot {name}": sorted(one_shot_point(rows, sc, t)[::-1]
                                         for t in th)  # type: ignore[arg-type]
              for name, (sc, th) in routers.items()}
    curves[f"cascade (K={k})"] = sorted(cascade_point(rows, k, t)[::-1] for t in cascade_candidates)
    _plot(curves, n, (cheap_j, cheap_right), (strong_j, strong_right), oracle_right, png)
    command = "benchmarks/cascade.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (RESULTS / f"cascade-{stamp}.md").write_text(
        f"# Cascade vs one-shot routing: quality per joule\n\n`{command.strip()}`\n\n{report}\n\n"
        f"![quality vs joules]({png.name})\n")
    print(f"wrote {png} and {png.with_suffix('.md')}")
    return 0


def _plot(curves: dict, n: int, cheap: tuple[float, int], strong: tuple[float, int],
          oracle: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([cheap[0] / 1000, strong[0] / 1000], [100 * cheap[1] / n, 100 * strong[1] / n], "k--",
            label="random routing (expected)")
    for name, curve in curves.items():
        ax.plot([j / 1000 for j, _ in curve], [100 * r / n for _, r in curve], ".-", label=name)
    ax.axhline(100 * oracle / n, color="grey", linestyle=":", label="oracle")
    ax.axhline(95 * strong[1] / n, color="grey", linestyle="-.", linewidth=0.8,
               label="95% of always-strong")
    ax.set_xlabel("total energy, kJ")
    ax.set_ylabel("answered right, %")
    ax.set_title("Cascade vs one-shot routing (every threshold)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
