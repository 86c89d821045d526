"""`joulegate serve`: run the gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from policies import DEFAULT_POLICY_PATH, PolicyError, load_policy

from ..logs import FORMATS, default_format, log_config
from ..preflight import missing_extras
from .common import new_key

#: Keys the embedded default policy reads from the environment; `serve` creates them.
DEFAULT_POLICY_KEYS = {"JOULEGATE_DEMO_KEY": "demo tenant", "JOULEGATE_ADMIN_KEY": "admin"}


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "joulegate"


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import POLICY_ENV, create_app
    from ..limits import MAX_HEAD_ENV, HeadLimitedHttpTools, install_overload_response

    path = Path(args.policy) if args.policy else DEFAULT_POLICY_PATH
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    missing = missing_extras(policy)
    if missing:  # one line each, with the install command: no traceback at start-up
        print(*(f"joulegate: {line}" for line in missing), sep="\n", file=sys.stderr)
        return 2
    if path.resolve() == DEFAULT_POLICY_PATH.resolve():
        keys = ensure_default_keys()
        print("joulegate: default policy; keys (also in ~/.local/state/joulegate/default-keys.json):")
        for var, who in DEFAULT_POLICY_KEYS.items():
            print(f"  {who:12s} {keys[var]}")
        sys.stdout.flush()
    host = args.host or policy.server.host
    port = args.port if args.port is not None else policy.server.port
    limits = policy.server.limits
    # The head cap reaches every worker process through the environment (they are spawned).
    os.environ[MAX_HEAD_ENV] = str(limits.max_header_bytes)
    HeadLimitedHttpTools.max_head_bytes = limits.max_header_bytes
    install_overload_response()
    # timeout_graceful_shutdown is the drain: past it uvicorn cancels what is still running,
    # and a cancelled stream ends with a server_shutting_down event and [DONE].
    # proxy_headers off: nothing here uses the client address, and uvicorn would rewrite it
    # from X-Forwarded-For on every request from a trusted (local) peer.
    options = {"host": host, "port": port, "loop": "uvloop", "http": HeadLimitedHttpTools,
               "proxy_headers": False,
               "access_log": False, "log_level": args.log_level.lower(),
               "log_config": log_config(args.log_level, args.log_format),
               "timeout_keep_alive": limits.keep_alive_timeout_s,
               "limit_concurrency": limits.max_connections,
               "timeout_graceful_shutdown": policy.server.shutdown_drain_s}
    if args.workers > 1:
        os.environ[POLICY_ENV] = str(path.resolve())
        # Workers keep their metrics in files here; GET /metrics merges them.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="joulegate-prom-"))
        uvicorn.run("gateway.app:create_served_app", factory=True, workers=args.workers,
                    **options)
    else:
        uvicorn.run(create_app(path, freeze_startup_heap=True), **options)
    return 0



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API",
        description="Serve the OpenAI-compatible API. Without --policy it serves the embedded "
                    "default policy (two local llama.cpp models) on 127.0.0.1:8080 and prints "
                    "a demo tenant key and an admin key.")
    serve.add_argument("--policy", metavar="FILE",
                       help="policy YAML file (default: the embedded default policy)")
    serve.add_argument("--host", help="listen address (default: the policy's server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: the policy's server.port)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (default: 1)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=FORMATS, default=default_format(),
                       help="json: one JSON object per line, for log shippers; text: for "
                            "people (default: text on a terminal, else json)")
    serve.set_defaults(func=cmd_serve)
