"""`joulegate route` and `joulegate router`: difficulty routing, explained and trained."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from . import router_collect
from .common import add_policy_option, policy_state


def cmd_route(args: argparse.Namespace) -> int:
    from backends import GenerationRequest

    from ..routing import create_estimator
    from ..routing.tiers import RouteContext, route

    policy, _ = policy_state(args.policy)
    tenant = args.tenant or next(iter(policy.tenants))
    if tenant not in policy.tenants:
        print(f"no tenant '{tenant}' in the policy", file=sys.stderr)
        return 1
    routing = policy.tenant_routing(tenant)
    if args.estimator:
        routing = routing.model_copy(update={"estimator": args.estimator})
    try:
        estimator = create_estimator(routing.estimator or "learned")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    generation = GenerationRequest(model="auto", messages=[{"role": "user", "content": prompt}],
                                   max_tokens=args.max_tokens)
    difficulty = estimator.score(generation)
    ctx = RouteContext(tuple(policy.tenant_tiers(tenant)),
                       next(t for t in policy.tiers if t.name == policy.tenants[tenant].default_tier),
                       routing, estimator)
    decision = route(ctx, generation)
    explain = getattr(estimator, "explain", None)
    neighbours = explain(generation, args.neighbours) if explain is not None else []
    if args.json:
        print(json.dumps({"tenant": tenant, "estimator": estimator.name,
                          "score": round(difficulty.score, 4), "tier": decision.tier.name,
                          "thresholds": routing.thresholds or {},
                          "features": {k: round(v, 4) for k, v in difficulty.features.items()},
                          **({"neighbours": [dataclasses.asdict(n) for n in neighbours]}
                             if explain is not None else {})}))
        return 0
    print(f"tenant {tenant}, estimator {estimator.name}: difficulty {difficulty.score:.3f} "
          f"-> tier {decision.tier.name}")
    gates = ", ".join(f"{t} >= {v:g}" for t, v in (routing.thresholds or {}).items()) or "none"
    print(f"thresholds: {gates} (default tier {ctx.default.name}; no budget pressure or "
          "capacity applied here)")
    for name, value in sorted(difficulty.features.items(), key=lambda kv: -kv[1]):
        if value:
            print(f"  {name:16s} {value:.3f}")
    if neighbours:
        print("nearest labelled prompts (similarity, source, cheap/strong tier right):")
        for n in neighbours:
            print(f"  {n.similarity:.3f} {n.source:10s} cheap {'ok ' if n.cheap_ok else 'bad'} "
                  f"strong {'ok ' if n.strong_ok else 'bad'}  {n.excerpt[:90]}")
    return 0


def _data_dir(args: argparse.Namespace) -> Path:
    """``--data``, else the routing data shipped in the source tree; exit 2 with one line
    when there is none (an installed package carries no data)."""
    from ..routing import train

    try:
        return Path(args.data) if args.data else train.default_data_dir()
    except FileNotFoundError as exc:
        print(f"joulegate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_router_train(args: argparse.Namespace) -> int:
    from ..routing import semantic_train, train
    from ..routing.estimators import MODEL_FILE
    from ..routing.semantic import SEMANTIC_FILE, SemanticUnavailable

    data = _data_dir(args)
    without = [name.strip() for name in (args.without or "").split(",") if name.strip()]
    refusal = ""
    if args.without is not None and args.estimator != "semantic":
        refusal = "--without is for --estimator semantic (learned trains on MMLU only)"
    elif args.without is not None and not args.out:
        refusal = "--without needs --out FILE (the shipped model trains on every source)"
    elif args.without is not None and not without:
        refusal = "--without names no source"
    if refusal:
        print(f"joulegate: {refusal}", file=sys.stderr)
        return 2
    if args.estimator in ("learned", "all"):
        out = Path(args.out) if args.out and args.estimator == "learned" else MODEL_FILE
        artefact = train.train(data, out)
        meta = artefact["meta"]
        print(f"learned: trained on {meta['examples']} MMLU prompts from {data} (degree "
              f"{meta['degree']}, L2 {meta['l2']:g}, chosen across subjects); wrote {out}")
    if args.estimator in ("semantic", "all"):
        out = Path(args.out) if args.out and args.estimator == "semantic" else SEMANTIC_FILE
        try:
            smeta = semantic_train.train(data, out, without=without)
        except (SemanticUnavailable, semantic_train.NoSuchSource) as exc:
            print(f"joulegate: {exc}", file=sys.stderr)
            return 2
        blend = ", ".join(f"{k} {v:g}" for k, v in smeta["blend"].items())
        print(f"semantic: trained on {smeta['examples']} prompts of "
              f"{', '.join(f'{s} ({n})' for s, n in smeta['sources'].items())}; head "
              f"{smeta['head']}, weights {blend} (chosen leaving one source out); "
              f"{smeta['references']} reference prompts; wrote {out}")
    return 0


def cmd_router_eval(args: argparse.Namespace) -> int:
    if args.labels:
        return _eval_labels(args)
    from ..routing import lodo, lodo_report
    from ..routing.labels import FORMATS
    from ..routing.semantic import SemanticUnavailable

    data = _data_dir(args)
    wordings = [w for w in args.wordings.split(",") if w] if args.wordings else list(FORMATS)
    unknown = sorted(set(wordings) - set(FORMATS))
    if unknown:
        print(f"joulegate: unknown wording(s) {', '.join(unknown)}; expected some of "
              f"{', '.join(FORMATS)}", file=sys.stderr)
        return 2
    try:
        report = lodo.evaluate(data, wordings, progress=lambda line: print(line, file=sys.stderr))
    except (SemanticUnavailable, ValueError) as exc:
        print(f"joulegate: {exc}", file=sys.stderr)
        return 2
    cells = report["cells"]
    print(lodo_report.main_table(cells))
    print()
    print(lodo_report.summary_table(cells))
    for line in lodo_report.humaneval_lines(cells):
        print(line)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = out_dir / f"router-eval-{stamp}.png"
    lodo_report.plot(report, png)
    md = png.with_suffix(".md")
    md.write_text(lodo_report.markdown(report, png.name, args.note or ""))
    print(f"wrote {png} and {md}")
    return 0


def _eval_labels(args: argparse.Namespace) -> int:
    """The shipped estimators, as trained in the package, on a user's labelled CSV."""
    from ..routing import chance, lodo

    try:
        examples, results = lodo.score_label_file(Path(args.labels))
    except (OSError, ValueError, KeyError) as exc:
        print(f"joulegate: {exc}", file=sys.stderr)
        return 2
    note = ("shipped estimators as trained in the package; nothing is fitted or tuned on this "
            "file (APGR is threshold-free: a sweep over each estimator's score order); p: how "
            "often a random order of the file's prompts scores at least that APGR; the "
            "threshold is this file's, for routing traffic like it (the cascade's: for its "
            "default probe), checked on alternate halves")
    null = chance.chance([e.gain for e in examples])
    band = None if null is None else [round(v, 4) for v in null.band]
    if args.json:
        print(json.dumps({"file": str(args.labels), "prompts": len(examples), "note": note,
                          "random_apgr_middle_95pct": band,
                          "estimators": {
                              name: ({"error": r["error"]} if "error" in r else
                                     {"apgr": round(r["apgr"], 4),
                                      "p_vs_chance": None if r["p"] is None
                                      else round(r["p"], 4),
                                      "strong_share_for_95pct": round(r["fraction95"], 4),
                                      "threshold_for_95pct": _setting(name, r["calibration"]),
                                      "alternate_halves": _halves(r["calibration"]),
                                      "scores": [round(s, 6) for s in r["scores"]]})
                              for name, r in results.items()}}))
        return 0
    weak = sum(e.weak for e in examples) / len(examples)
    strong = sum(e.strong for e in examples) / len(examples)
    spread = "" if band is None else (f"; random routing's APGR here: {band[0]:.3f} to "
                                      f"{band[1]:.3f} (middle 95% of {chance.DRAWS} orders)")
    print(f"{args.labels}: {len(examples)} prompts, cheap tier right {weak:.1%}, strong "
          f"{strong:.1%}{spread}; {note}")
    print("| estimator | APGR | p vs chance | strong share for 95% of strong quality "
          "| threshold for 95% here | that rule chosen on alternate halves, on the other half "
          "|\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | - | not available here: {r['error']} | - | - |")
            continue
        cal = r["calibration"]
        setting = _setting(name, cal)
        if cal["quality"] is None:
            setting = "- (the strong tier got none right)"
        elif setting is None:
            setting = "none needed: the cheap tier keeps 95%"
        halves = "-" if cal["halves_quality"] is None else (
            f"{cal['halves_quality']:.1%} of strong quality at {cal['halves_cost']:.1%} "
            f"{'of always-strong joules' if cal['cost_of'] == 'joules' else 'sent strong'}")
        p = "-" if r["p"] is None else f"{r['p']:.3f}"
        print(f"| {name} | {r['apgr']:.3f} | {p} | {r['fraction95']:.1%} | {setting} "
              f"| {halves} |")
    return 0


def _halves(calibration: dict[str, Any]) -> dict[str, Any] | None:
    if calibration["halves_quality"] is None:
        return None
    return {"quality_share": round(calibration["halves_quality"], 4),
            "cost_share": round(calibration["halves_cost"], 4),
            "cost_of": calibration["cost_of"]}


def _setting(estimator: str, calibration: dict[str, Any]) -> str | None:
    """The policy setting that routes this file's traffic at 95% of strong quality: a
    difficulty threshold on the strong tier (a score at or above it goes strong), or the
    cascade's confidence threshold (it escalates below it; its scores here are 1 -
    confidence). Rounded to 6 places toward sending more strong, never fewer."""
    t = calibration["threshold"]
    if t is None:
        return None
    if estimator == "cascade":
        # just above the confidence of the least unsure prompt that must escalate
        c = math.floor((1.0 - t) * 1e6) / 1e6 + 1e-6
        if c > 1.0:
            return "routing.cascade.threshold: 1 (even then, fully confident probes stay)"
        return f"routing.cascade.threshold: {c:.6f}"
    return f"routing.thresholds.<strong tier>: {math.floor(t * 1e6) / 1e6:.6f}"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rt = sub.add_parser(
        "route", help="show how `model: auto` would route a prompt",
        description="Score a prompt's difficulty and show the tier `model: auto` would pick "
                    "for it, with the features behind the score (no budget pressure or "
                    "capacity applied).")
    rt.add_argument("prompt", help="the prompt, or - to read it from standard input")
    add_policy_option(rt)
    rt.add_argument("--tenant", help="tenant whose routing applies (default: the first)")
    rt.add_argument("--estimator", help="use this estimator instead of the policy's")
    rt.add_argument("--max-tokens", type=int, default=None, help="the request's max_tokens")
    rt.add_argument("--json", action="store_true", help="print one JSON object")
    rt.add_argument("--neighbours", type=int, default=5, metavar="N",
                    help="labelled prompts to show for the semantic estimator (default 5)")
    rt.set_defaults(func=cmd_route)

    router = sub.add_parser("router", help="train and evaluate the difficulty estimators",
                            description="Train and evaluate the learned and semantic difficulty "
                                        "estimators on labelled routing data.")
    router_sub = router.add_subparsers(dest="router_command", required=True, metavar="COMMAND")
    rtrain = router_sub.add_parser("train", help="refit the shipped router models")
    rtrain.add_argument("--data", metavar="DIR",
                        help="routing data folder (default: the one shipped in the repository)")
    rtrain.add_argument("--estimator", choices=("learned", "semantic", "all"), default="all",
                        help="which model to refit (default: all)")
    rtrain.add_argument("--out", metavar="FILE",
                        help="where to write the model, with --estimator learned or semantic "
                             "(default: the packaged router_model.json / semantic_model.npz)")
    rtrain.add_argument("--without", metavar="SOURCES",
                        help="semantic: leave these labelled sources (comma-separated folder "
                             "names) out of training, to score one of them as unseen work")
    rtrain.set_defaults(func=cmd_router_train)
    reval = router_sub.add_parser(
        "eval", help="score the routers leaving one dataset out (table + PNG), or on your CSV",
        description="Leave-one-dataset-out benchmark of every estimator over the labelled "
                    "sources, in several wordings; or, with --labels, the shipped estimators "
                    "(nothing refitted) on your own prompt,cheap_ok,strong_ok CSV.")
    reval.add_argument("--data", metavar="DIR",
                       help="routing data folder (default: the one shipped in the repository)")
    reval.add_argument("--out-dir", default="benchmarks/results", metavar="DIR",
                       help="where the table and the plot go (default: benchmarks/results)")
    reval.add_argument("--wordings", metavar="LIST",
                       help="comma-separated wordings to score each source in (default: all of "
                            "bare,system,fewshot,completion,chat)")
    reval.add_argument("--note", help="a line appended to the markdown report")
    reval.add_argument("--labels", metavar="FILE.csv",
                       help="score the shipped estimators on this CSV (prompt,cheap_ok,strong_ok), "
                            "each with its threshold for traffic like the file's")
    reval.add_argument("--json", action="store_true",
                       help="with --labels: per estimator the APGR and every prompt's score")
    reval.set_defaults(func=cmd_router_eval)
    router_collect.register(router_sub)  # `joulegate router collect`
