#!/usr/bin/env python3
"""Gateway overhead: joulegate (and optionally the LiteLLM proxy) against a fast fake upstream.

Drives ``../shared/bench/run_compare.sh`` (fake upstream, wrk load, CPU accounting) for
non-streaming and streaming requests at concurrency 1 and 32, then prints one table and
writes it to ``benchmarks/results/overhead-<time>.md`` with the raw runs beside it.

    .venv/bin/python benchmarks/overhead.py                 # joulegate only
    .venv/bin/python benchmarks/overhead.py --litellm       # + LiteLLM, same run, same workers
    .venv/bin/python benchmarks/overhead.py --duration 5 --repeats 1   # quick look

Needs ``wrk`` (``apt-get install -y wrk``). ``--litellm`` creates its venv on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KEY = "sk-bench-joulegate"
UPSTREAM_PORT = 18080


def policy_yaml(budgeted: bool = False) -> str:
    import hashlib

    digest = hashlib.sha256(KEY.encode()).hexdigest()
    budget = "\n    budgets: [{window: 1d, joules: 1.0e12}]" if budgeted else ""
    return f"""version: 1
state_dir: {RESULTS / "runs" / "state"}
backends:
  fake:
    kind: openai
    base_url: http://127.0.0.1:{UPSTREAM_PORT}/v1
tiers:
  - {{name: fake, backend: fake, model: fake-model, cost: 1}}
tenants:
  bench:
    keys: ["sha256:{digest}"]
    default_tier: fake{budget}
"""


def run_compare(bench: Path, label: str, stream: bool, args: argparse.Namespace, cmd: list[str],
                env_extra: dict[str, str], script: str = "run_compare.sh") -> Path:
    out = RESULTS / "runs" / f"{label}-{'stream' if stream else 'json'}-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {**os.environ, "LABEL": label, "STREAM": "1" if stream else "0", "RESULTS_DIR": str(out),
           "DURATION": str(args.duration), "REPEATS": str(args.repeats), "WARMUP": str(args.warmup),
           "CONCS": "1 32", "UPSTREAM_PORT": str(UPSTREAM_PORT), "UPSTREAM_PYTHON": sys.executable,
           "PROXY_CPUS": args.proxy_cpus, **env_extra}
    subprocess.run([str(bench / script), *cmd], env=env, check=True)
    return out


def summarize(run_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["target"], r["conns"]), []).append(r)
    out = {}
    for key, runs in rows.items():
        out[key] = {
            "rps": statistics.mean(r["rps"] for r in runs),
            "p50": statistics.mean(r["p50_ms"] for r in runs),
            "p99": statistics.mean(r["p99_ms"] for r in runs),
            "cpu_ms": statistics.mean(r["proxy_cpu_ms_per_req"] or 0 for r in runs),
            "rss": max(r["proxy_rss_mb"] or 0 for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
    return out


def table(results: dict[str, dict[tuple[str, int], dict[str, float]]], workers: int) -> str:
    lines = [f"| gateway ({workers} worker) | mode | conc | req/s | p50 ms | p99 ms | added p50 ms "
             "| CPU ms/req | RSS MB | errors |", "|" + "---|" * 10]
    for label, res in results.items():
        name, mode = label.rsplit(":", 1)
        for conc in (1, 32):
            direct, proxy = res.get(("direct", conc)), res.get(("proxy", conc))
            if direct and name == next(iter(results)).rsplit(":", 1)[0]:
                lines.append(f"| direct (upstream) | {mode} | {conc} | {direct['rps']:,.0f} | "
                             f"{direct['p50']:.3f} | {direct['p99']:.3f} | - | - | - | {direct['errors']} |")
            if proxy:
                added = proxy["p50"] - (direct["p50"] if direct else 0)
                lines.append(f"| {name} | {mode} | {conc} | {proxy['rps']:,.0f} | {proxy['p50']:.3f} | "
                             f"{proxy['p99']:.3f} | {added:.3f} | {proxy['cpu_ms']:.3f} | "
                             f"{proxy['rss']:.0f} | {proxy['errors']} |")
    return "\n".join(lines)


def ensure_litellm(venv: Path) -> None:
    if (venv / "bin" / "litellm").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--proxy-cpus", default="0", help="taskset list for the gateway ('' = unpinned)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming runs")
    parser.add_argument("--litellm", action="store_true", help="also measure the LiteLLM proxy")
    parser.add_argument("--budgeted", action="store_true",
                        help="give the tenant a joule budget (embedded ledger in the path)")
    parser.add_argument("--litellm-venv", default=str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                      "bench-venvs" / "litellm"))
    args = parser.parse_args()
    bench = Path(args.bench_dir)
    if not (bench / "run_compare.sh").exists():
        sys.exit(f"no benchmark harness at {bench} (expected ../shared/bench)")
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    RESULTS.mkdir(parents=True, exist_ok=True)
    policy = RESULTS / "runs" / "overhead-policy.yaml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(policy_yaml(args.budgeted))
    joulegate = [str(Path(sys.executable).parent / "joulegate"), "serve", "--policy", str(policy),
                 "--port", "8000", "--workers", str(args.workers)]  # default logging: access log on
    gw_env = {"PROXY_BASE_URL": "http://127.0.0.1:8000/v1", "PROXY_API_KEY": KEY,
              "MODEL": "fake-model", "PROXY_VERSION": "joulegate 0.1.0"}
    modes = [False] if args.no_stream else [False, True]
    results: dict[str, dict] = {}
    for stream in modes:
        mode = "stream" if stream else "json"
        label = "joulegate+budget" if args.budgeted else "joulegate"
        run = run_compare(bench, label, stream, args, joulegate, gw_env)
        results[f"{label}:{mode}"] = summarize(run)
        if args.litellm:
            venv = Path(args.litellm_venv)
            ensure_litellm(venv)
            run = run_compare(bench, f"litellm-{args.workers}w", stream, args, [str(args.workers)],
                              {"LITELLM_VENV": str(venv)}, script="litellm/run_litellm.sh")
            results[f"litellm:{mode}"] = summarize(run)
    report = (f"# Gateway overhead, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
              f"{os.cpu_count()} cores; gateway pinned to CPUs '{args.proxy_cpus}', wrk and the fake "
              f"upstream share the other core; {args.duration} s x {args.repeats} runs per row after "
              f"{args.warmup} s warm-up; request: 127 B chat completion, max_tokens 16.\n\n"
              + table(results, args.workers) + "\n")
    out = RESULTS / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(report)
    print(report)
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
