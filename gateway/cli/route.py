"""`joulegate route` and `joulegate router`: difficulty routing, explained and trained."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
    if args.json:
        print(json.dumps({"tenant": tenant, "estimator": estimator.name,
                          "score": round(difficulty.score, 4), "tier": decision.tier.name,
                          "thresholds": routing.thresholds or {},
                          "features": {k: round(v, 4) for k, v in difficulty.features.items()}}))
        return 0
    print(f"tenant {tenant}, estimator {estimator.name}: difficulty {difficulty.score:.3f} "
          f"-> tier {decision.tier.name}")
    gates = ", ".join(f"{t} >= {v:g}" for t, v in (routing.thresholds or {}).items()) or "none"
    print(f"thresholds: {gates} (default tier {ctx.default.name}; no budget pressure or "
          "capacity applied here)")
    for name, value in sorted(difficulty.features.items(), key=lambda kv: -kv[1]):
        if value:
            print(f"  {name:16s} {value:.3f}")
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
    from ..routing import train
    from ..routing.estimators import MODEL_FILE

    data = _data_dir(args)
    out = Path(args.out) if args.out else MODEL_FILE
    artefact = train.train(data, out)
    meta = artefact["meta"]
    print(f"trained on {meta['examples']} prompts from {data} (degree {meta['degree']}, "
          f"L2 {meta['l2']:g}, chosen across subjects); wrote {out}")
    return 0


def cmd_router_eval(args: argparse.Namespace) -> int:
    from ..routing import train

    data = _data_dir(args)
    curves, info = train.evaluate(data)
    report = train.table(curves)
    print(report)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = out_dir / f"router-eval-{stamp}.png"
    train.plot(curves, info, png)
    folds = "\n".join(
        f"- fold {i + 1} ({chosen}; APGR held out: "
        + ", ".join(f"{name} {apgr:.3f}" for name, apgr in per_fold.items()) + f"): {subjects}"
        for i, (subjects, chosen, per_fold) in enumerate(zip(info["folds"], info["chosen"],
                                                              info["per_fold"], strict=True)))
    (out_dir / f"router-eval-{stamp}.md").write_text(
        f"# Router label benchmark (MMLU, held-out subjects)\n\n{report}\n\n"
        f"{info['prompts']} prompts ({info['excluded_contaminated']} contaminated excluded); "
        f"weak accuracy {info['weak_accuracy']:.3f}, strong {info['strong_accuracy']:.3f}. "
        "`learned` is refitted per fold on the other folds' subjects, its degree and L2 "
        "penalty chosen by cross-validation across those subjects only.\n\n"
        f"{folds}\n\n"
        f"![quality vs strong fraction]({png.name})\n")
    print(f"wrote {png} and {png.with_suffix('.md')}")
    return 0


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
    rt.set_defaults(func=cmd_route)

    router = sub.add_parser("router", help="train and evaluate the learned difficulty estimator",
                            description="Train and evaluate the learned difficulty estimator "
                                        "on labelled routing data.")
    router_sub = router.add_subparsers(dest="router_command", required=True, metavar="COMMAND")
    rtrain = router_sub.add_parser("train", help="refit the shipped router model")
    rtrain.add_argument("--data", metavar="DIR",
                        help="routing data folder (default: the one shipped in the repository)")
    rtrain.add_argument("--out", metavar="FILE", help="where to write the model "
                                                      "(default: the packaged router_model.json)")
    rtrain.set_defaults(func=cmd_router_train)
    reval = router_sub.add_parser("eval", help="score the routers on held-out subjects (table + PNG)")
    reval.add_argument("--data", metavar="DIR",
                       help="routing data folder (default: the one shipped in the repository)")
    reval.add_argument("--out-dir", default="benchmarks/results", metavar="DIR",
                       help="where the table and the plot go (default: benchmarks/results)")
    reval.set_defaults(func=cmd_router_eval)
