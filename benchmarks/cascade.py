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
  (``--statistic``: ``mean``, exp(mean log-probability), or ``min``, the least likely token's
  probability, as :func:`gateway.routing.estimators.confidence` computes it) below the threshold
  drops that answer and asks the strong tier, paying the probe *and* the strong answer. The
  probe's joules are the cheap answer's joules scaled to the tokens it had made by then (prompt
  tokens weighted by the tier's joules_per_prompt_token / joules_per_output_token seeds). The
  log-probabilities are the whole cheap answer's where the labels carry them
  (``cheap_answer_logprobs``), else the recorded probe's (``cheap_logprobs``).
- ``oracle``: the strong tier only where the cheap one is wrong and the strong one right.

No threshold is tuned on the prompts it is reported on: the prompts are split in two halves
(alternate rows of each source); each router's threshold is chosen on one half as the
cheapest that keeps 95% of always-strong's quality there, and reported on the other half,
then the halves swap; the table gives the sum of both reported halves. With ``--select`` a
last row also chooses the cascade's ``K`` and statistic (from :data:`GRID`) with its threshold
on each half. The full sweep over every threshold is plotted as a curve (PNG) for the shape,
not for choosing; the last two columns read it against random routing at equal joules, over
every threshold whose joules lie between always-cheap's and always-strong's: the least margin,
and the share of those thresholds below random.

    .venv/bin/python benchmarks/cascade.py [--labels FILE ...] [--probe-tokens 8]
        [--statistic mean|min] [--select]

Writes ``benchmarks/results/cascade-<stamp>.md`` and ``.png``; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.cli.router_collect import MCQ_INSTRUCTION  # noqa: E402
from gateway.routing.estimators import confidence  # noqa: E402
from gateway.routing.train import against_random  # noqa: E402

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

    def confidence(self, k: int, statistic: str = "mean") -> float:
        """What the gateway's cascade computes of the first ``k`` tokens."""
        return confidence(list(self.logprobs[:k]), statistic)

    def probe_joules(self, k: int) -> float:
        return probe_joules(self.cheap_j, self.prompt_tokens, self.completion_tokens, k)


def probe_joules(cheap_j: float, prompt_tokens: int, completion_tokens: int, k: int) -> float:
    """A cheap answer's joules up to its ``k``-th token (all of it when shorter), the prompt
    tokens weighted by :data:`PROMPT_WEIGHT`."""
    made = min(k, completion_tokens)
    whole = PROMPT_WEIGHT * prompt_tokens + completion_tokens
    return cheap_j * (PROMPT_WEIGHT * prompt_tokens + made) / whole if whole else 0.0


def load(paths: list[Path]) -> list[Row]:
    out = []
    for path in paths:
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                # the whole answer's (benchmarks/humaneval.py answer-logprobs), else the probe's
                logprobs = r.get("cheap_answer_logprobs") or r.get("cheap_logprobs")
                if not logprobs:
                    continue
                out.append(Row(r["prompt"], r.get("source") or path.parent.name,
                               r["cheap_ok"] == "1", r["strong_ok"] == "1",
                               float(r["cheap_joules"]), float(r["strong_joules"]),
                               int(r["cheap_prompt_tokens"]), int(r["cheap_completion_tokens"]),
                               tuple(float(x) for x in logprobs.split()),
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


def cascade_point(rows: list[Row], k: int, threshold: float,
                  statistic: str = "mean") -> tuple[int, float]:
    right, joules = 0, 0.0
    for row in rows:
        if row.confidence(k, statistic) >= threshold:
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


def choose(idx: list, point, candidates: list[float], target: float
           ) -> tuple[float, float] | None:
    """The cheapest threshold whose right answers on prompts ``idx`` are at least ``target``
    and its joules there; None when no threshold reaches it."""
    best: tuple[float, float] | None = None
    for t in candidates:
        right, joules = point(idx, t)
        if right >= target - 1e-9 and (best is None or joules < best[1]):
            best = (t, joules)
    return best


#: A router's outcome on some prompts (indices) at a threshold: right answers and joules.
Point = Callable[[list[int], float], tuple[int, float]]
#: What ``--select`` chooses among, with the threshold, on each fitting half.
GRID = [(k, statistic) for k in (4, 8, 16, 32, 64, 128) for statistic in ("mean", "min")]


def one_shot(rows: list[Row], scores: list[float]) -> Point:
    return lambda idx, t: one_shot_point([rows[i] for i in idx], [scores[i] for i in idx], t)


def cascade_router(rows: list[Row], k: int, statistic: str) -> tuple[Point, list[float], float]:
    """The cascade at ``k`` probe tokens: its outcome, its thresholds (it escalates below
    one: every confidence, and above all), and ``inf``, the threshold that escalates all."""
    confidences = [r.confidence(k, statistic) for r in rows]
    return ((lambda idx, t: cascade_point([rows[i] for i in idx], k, t, statistic)),
            [-math.inf, *sorted(set(confidences)), math.inf], math.inf)


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
    parser.add_argument("--statistic", choices=("mean", "min"), default="mean",
                        help="the cascade's confidence of its probe tokens (as the policy's)")
    parser.add_argument("--select", action="store_true",
                        help="also a cascade whose probe_tokens and statistic (from GRID) are "
                        "chosen with its threshold on each half")
    parser.add_argument("--estimators", default="heuristic,learned,semantic")
    parser.add_argument("--quality", type=float, default=0.95,
                        help="share of always-strong's quality each threshold must keep")
    args = parser.parse_args(argv)
    rows = load(args.labels)
    if not rows:
        print("no labelled rows with cheap_logprobs: run `joulegate router collect` first",
              file=sys.stderr)
        return 1
    # Each router: (which prompts -> right answers and joules at a threshold, the thresholds
    # that change a decision, the threshold that sends everything to the strong tier).
    routers: dict[str, tuple[Point, list[float], float]] = {}
    for name in args.estimators.split(","):
        scores = estimator_scores(name, rows)
        if scores is not None:
            routers[f"one-shot {name}"] = (one_shot(rows, scores), thresholds_of(scores),
                                           -math.inf)
    k, statistic = args.probe_tokens, args.statistic
    cascades = {(kk, st): cascade_router(rows, kk, st)
                for kk, st in {(k, statistic), *(GRID if args.select else ())}}
    cascade_name = f"cascade (K={k}, {statistic})"
    routers[cascade_name] = cascades[(k, statistic)]

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
    table.append(("always-cheap", "", cheap_right, cheap_j, None))
    table.append(("always-strong", "", strong_right, strong_j, None))
    table.append(("oracle", "", oracle_right, oracle_j, None))

    def target(idx: list[int]) -> float:
        return args.quality * sum(rows[i].strong_ok for i in idx)

    def margin_at(joules: float, quality: float) -> float:
        """Over random routing at ``joules`` (held within always-cheap's and -strong's)."""
        lo, hi = sorted((cheap_j, strong_j))
        return against_random([(min(max(joules, lo), hi), quality)],
                              (cheap_j, cheap_right / n), (strong_j, strong_right / n))[0]

    def versus_random(point: Point, candidates: list[float]) -> tuple[float, float]:
        """Over every threshold whose joules are above always-cheap's and at most
        always-strong's: the least margin over random routing at equal joules, and the share
        of those thresholds at which the router is below random."""
        swept = (point(list(range(n)), t) for t in candidates)
        least, below, count = against_random(
            ((j, right / n) for right, j in swept if cheap_j < j <= strong_j),
            (cheap_j, cheap_right / n), (strong_j, strong_right / n))
        return least, below / count if count else 0.0

    for label, (point, candidates, fallback) in routers.items():
        right, joules, picked = 0, 0.0, []
        for fit, report in ((a, b), (b, a)):
            chosen = choose(fit, point, candidates, target(fit))
            t = chosen[0] if chosen is not None else fallback
            r_, j_ = point(report, t)
            right += r_
            joules += j_
            picked.append(f"{t:.3f}")
        table.append((label, " / ".join(picked), right, joules, versus_random(point, candidates)))
    if args.select:  # probe_tokens and statistic chosen with the threshold, per half
        right, joules, picked = 0, 0.0, []
        for fit, report in ((a, b), (b, a)):
            best: tuple[float, tuple[int, str], float] | None = None
            for config, (point, candidates, _) in cascades.items():
                chosen = choose(fit, point, candidates, target(fit))
                if chosen is not None and (best is None or chosen[1] < best[0]):
                    best = (chosen[1], config, chosen[0])
            config, t = (best[1], best[2]) if best is not None else ((k, statistic), math.inf)
            r_, j_ = cascades[config][0](report, t)
            right += r_
            joules += j_
            picked.append(f"K={config[0]} {config[1]} {t:.3f}")
        table.append(("cascade (K, statistic chosen per half)", " / ".join(picked), right,
                      joules, None))

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
        "joules | % of always-strong joules | J per right answer | vs random at same joules | "
        "every threshold: least margin vs random | thresholds below random |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for label, thr, right, joules, swept in table:
        q = right / n
        delta = margin_at(joules, q)
        sweep = (f"{swept[0] * 100:+.1f} pts | {swept[1]:.0%}"
                 if swept is not None else " | ")
        lines.append(f"| {label} | {thr} | {q:.1%} | {right / max(strong_right, 1):.1%} | "
                     f"{joules:,.0f} | {joules / strong_j:.1%} | {joules / max(right, 1):,.1f} | "
                     f"{delta * 100:+.1f} pts | {sweep} |")
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
    every = list(range(n))
    curves = {label: sorted(point(every, t)[::-1] for t in candidates)
              for label, (point, candidates, _) in routers.items()}
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
