"""The leave-one-dataset-out report (:mod:`.lodo`) as markdown tables and a PNG curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .chance import DRAWS, LEVEL
from .labels import MIN_PROMPTS
from .lodo import CASCADES, ESTIMATOR_NAMES, PRIOR, VARIANTS, Cell, compares_wordings, summary

BASELINES = ("random", "oracle")
TARGET_APGR = 0.62
TARGET_JOULES = 0.85


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main_table(cells: list[Cell]) -> str:
    """Per held-out source (and file, where a source has several), in the wording it was
    labelled in: APGR, strong fraction and joules needed for 95% of strong quality, the least
    margin over random at equal joules, and the APGR spread over the other wordings."""
    names = (*ESTIMATOR_NAMES, *CASCADES, *VARIANTS, *BASELINES)
    lines = ["| held out | estimator | APGR | p vs chance | APGR over wordings (min to max) "
             "| strong share for 95% | joules for 95% (of always-strong) "
             "| least margin vs random | at threshold fixed on training sources: quality, cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for source in sorted({c.source for c in cells}):
        for name in names:
            native = [c for c in cells if c.source == source and c.estimator == name
                      and c.wording == "native"]
            if not native:
                continue
            c = native[0]
            others = [x.apgr for x in cells if x.source == source and x.estimator == name]
            spread = (f"{min(others):.3f} to {max(others):.3f}"
                      if len(others) > 1 else "-")
            margin = "-" if c.margin is None else f"{c.margin:+.3f}"
            fixed = ("-" if c.fixed is None else
                     f"{c.fixed[1]:.1%} of strong quality at {c.fixed[2]:.1%} "
                     f"{'joules' if c.joules95 is not None else 'strong share'}")
            p = "-" if c.p is None or name in BASELINES else f"{c.p:.3f}"
            lines.append(f"| {source} | {name} | {c.apgr:.3f} | {p} | {spread} "
                         f"| {_pct(c.fraction95)} "
                         f"| {_pct(c.joules95)} | {margin} | {fixed} |")
    return "\n".join(lines)


def wording_table(cells: list[Cell]) -> str:
    """APGR of every estimator on every held-out source in every wording."""
    cells = [c for c in cells if "+cv" not in c.source]
    wordings = sorted({c.wording for c in cells if compares_wordings(c.source)},
                      key=lambda w: (w != "native", w))
    lines = ["| held out | estimator | " + " | ".join(wordings) + " | spread |",
             "|---|---|" + "---|" * (len(wordings) + 1)]
    for source in sorted({c.source for c in cells if compares_wordings(c.source)}):
        for name in (*ESTIMATOR_NAMES, *CASCADES, *VARIANTS):
            row = {c.wording: c.apgr for c in cells if c.source == source and c.estimator == name}
            if not row:
                continue
            lines.append(f"| {source} | {name} | "
                         + " | ".join(f"{row[w]:.3f}" if w in row else "-" for w in wordings)
                         + f" | {max(row.values()) - min(row.values()):.3f} |")
    return "\n".join(lines)


def summary_table(cells: list[Cell]) -> str:
    lines = ["| estimator | held-out sources | mean APGR (held out) | worst APGR "
             f"| mean's p vs chance | better than chance (p < {LEVEL:g}) "
             f"| worst over wordings | widest wording spread "
             f"| target ≥ {TARGET_APGR} mean and worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = summary(cells)
    every = max(s["sources"] for s in rows.values())
    for name, s in rows.items():
        met = "met" if s["mean"] >= TARGET_APGR and s["worst"] >= TARGET_APGR else "not met"
        if s["sources"] < every:
            met += f" (on {s['sources']:.0f} of {every:.0f})"
        mean_p = "-" if math.isnan(s["mean_p"]) else f"{s['mean_p']:.3f}"
        lines.append(f"| {name} | {s['sources']:.0f} | {s['mean']:.3f} | {s['worst']:.3f} | "
                     f"{mean_p} | {s['above_chance']:.0f} of {s['sources']:.0f} | "
                     f"{s['worst_any_wording']:.3f} | {s['widest_spread']:.3f} | {met} |")
    return "\n".join(lines)


def humaneval_lines(cells: list[Cell]) -> list[str]:
    """The HumanEval target per file (wording the tiers were asked in): 95% of always-full
    pass@1 at ≤ 85% of its joules, and above random at every budget."""
    out = []
    for c in cells:
        if not c.source.startswith("humaneval/") or c.wording != "native" \
                or c.estimator in BASELINES or c.joules95 is None or c.margin is None:
            continue
        ok = c.joules95 <= TARGET_JOULES and c.margin >= 0
        how = "problems held out, source seen" if "+cv" in c.source else "source held out"
        fixed = ("" if c.fixed is None else
                 f"; at the threshold fixed on the training sources: {c.fixed[1]:.1%} of full "
                 f"pass@1 at {c.fixed[2]:.1%} of its joules")
        out.append(f"- {c.source} ({how}), {c.estimator}: 95% of full pass@1 at "
                   f"{c.joules95:.1%} of always-full joules (sweep); least margin over random "
                   f"at equal joules {c.margin:+.3f} → target {'met' if ok else 'not met'}"
                   f"{fixed}")
    return out


def _source_line(name: str, info: dict[str, Any], report: dict[str, Any]) -> str:
    """A held-out source: its size, the tiers' quality, random routing's spread on it and
    what was chosen without it."""
    band = info.get("chance")
    return (f"- {name}: {info['prompts']} prompts, cheap-tier quality {info['weak']:.3f}, "
            f"strong {info['strong']:.3f}, joules "
            f"{'labelled' if info['joules'] else 'not labelled'}; "
            + ("" if band is None else f"random routing's APGR {band[0]:.3f} to {band[1]:.3f} "
               f"(middle 95% of {DRAWS} random orders); ")
            + f"semantic chosen without it: {report['chosen'][name]}"
            + "".join(f"; prior weight for {row}+{PRIOR} chosen without it: {weight:g}"
                      for row, weight in report.get("prior_weights", {}).get(name, {}).items()))


def markdown(report: dict[str, Any], png_name: str, note: str = "") -> str:
    cells: list[Cell] = report["cells"]
    sources = "\n".join(_source_line(name, info, report)
                         for name, info in report["sources"].items())
    sources += "".join(f"\n- {name}: skipped, {count} labelled prompts so far (fewer than "
                       f"{MIN_PROMPTS}; picked up once it has more)"
                       for name, count in report.get("skipped", {}).items())
    return (
        "# Router benchmark: leave one dataset out\n\n"
        "Each labelled source is held out in turn; `learned` and `semantic` are refitted on the "
        "other sources only, their hyper-parameters (penalty; embedding head and the weights of "
        "embedding, shape and prior parts) chosen by cross-validation inside those sources "
        "(leave-one-source-out when there are several); `heuristic` is not fitted. No "
        "threshold is tuned on the reported set: the 95%-quality costs are read off the sweep "
        "over each estimator's score order. `semantic-knn` and `semantic-linear` are the "
        "embedding-only heads, shown to make the choice visible. The last column applies one "
        "threshold per estimator fixed on the *training* sources (the score at which each "
        "training source's sweep reaches 95% of its strong quality, averaged) to the held-out "
        "source, as a deployment would. `cascade` ranks a held-out source's prompts by how "
        "unsure the cheap tier's answer began (1 - the confidence of the policy's default "
        "probe, from the labelled log-probabilities); it fits nothing, and is scored only on the "
        "prompts that recorded those log-probabilities, in their labelled wording; what it "
        "costs (it also pays the probe) is `benchmarks/cascade.py`'s. `cascade-prompt` ranks "
        "them by how unfamiliar the cheap tier found the prompt's own text (1 - exp of its mean "
        "log-probability, the cascade's `signal: prompt`; measured by "
        "`benchmarks/prompt_scores.py` through the llama.cpp backend, in the labelled wording, "
        "and only on the prompts scored there: a sample of MMLU's); it fits nothing either. "
        "Its other wordings (`prompt_scores.py --wordings`) are on the prompts scored in every "
        "wording; where those are a sample of the source (MMLU, 4 per subject), they are the "
        "rows `<source>/sample`, with the labelled wording's APGR on the same sample. "
        "`cascade+heuristic` and `cascade-prompt+heuristic` are the same two with "
        "`routing.cascade.prior: heuristic`: each confidence times exp(-w x the heuristic's "
        "score), w the prior weight that ranks the *training* sources best (highest worst-source "
        "APGR, then mean; given per source above). For the cascade's rows the last column "
        "is a capacity share fixed on the training sources instead of a threshold (the share "
        "at which each training source's sweep reaches 95% of its strong quality, averaged; "
        "the least sure that share of the held-out source, or of each of its files, escalates, "
        "as `capacity` with "
        "`threshold: 1` does), its cost the strong share, as the probe's joules are not "
        "this sweep's. "
        "Random and oracle are the "
        "baselines (random APGR is 0.5 in expectation). `p vs chance` is how often a random "
        "order of the same prompts scores at least the row's APGR (a permutation test over "
        f"{DRAWS} seeded orders of the prompts the row is scored on, ranked into the row's "
        "own ties; each source's middle 95% for a router without ties is given above): a few "
        "hundred prompts leave random routing's own APGR anywhere in about 0.38 to 0.62, so "
        f"an APGR is called better than chance only at p < {LEVEL:g}, one row at a time (with "
        "a dozen rows per source, one in twenty at that level is chance's). Rows `<source>+cv` are sources of "
        "our own tiers' labels evaluated with their *problems* held out instead (4 folds; "
        "models fitted on every other source and the other folds): the shipped models do "
        "train on those sources, so this is what to expect on new problems of a kind they "
        "have seen; they are not part of the leave-one-dataset-out summary.\n\n"
        f"## Sources\n\n{sources}\n\n"
        f"## Held out, in the wording each source was labelled in\n\n{main_table(cells)}\n\n"
        f"## Summary (held-out sources, labelled wording)\n\n{summary_table(cells)}\n\n"
        "## HumanEval on our own small and full tiers (held out)\n\n"
        + ("\n".join(humaneval_lines(cells)) or "- no HumanEval source") + "\n\n"
        "## Robustness to wording (APGR; labels stay those of the labelled wording)\n\n"
        f"{wording_table(cells)}\n\n"
        f"![quality vs joules per held-out source]({png_name})\n\n{note}\n")


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: list[Cell] = report["cells"]
    sources = sorted({c.source for c in cells})
    cols = min(len(sources), 3)
    rows = (len(sources) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, source in zip(axes.flat, sources, strict=False):
        mine = [c for c in cells if c.source == source and c.wording == "native"]
        for c in mine:
            joules, quality = c.curve
            if not joules:  # not priced (the cascade): its joules are not this sweep's
                continue
            style = {"random": ":", "oracle": "--"}.get(c.estimator, "-")
            ax.plot([100 * j for j in joules], [100 * q for q in quality], style,
                    label=f"{c.estimator} ({c.apgr:.2f})", linewidth=1.4)
        has_joules = mine and mine[0].joules95 is not None
        ax.set_xlabel("joules (% of always-strong)" if has_joules
                      else "prompts sent to the strong tier (%)")
        ax.set_ylabel("quality (%)")
        ax.set_title(f"held out: {source}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
