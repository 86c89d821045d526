#!/usr/bin/env python3
"""The in-process llama.cpp tier against llama.cpp's own tools, side by side in one run.

Anchors, built by ``scripts/build-llama-tools`` from the llama.cpp source that the pinned
llama-cpp-python sdist vendors (MIT), with the bootstrap's CPU flags (``backends/llamacpp_build.py``):

(a) ``llama-batched-bench`` on the small GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): the
    ceiling for batched decode on this CPU (random tokens, no sampling, no HTTP), one process
    per batch size so that its CPU time is its own;
(b) ``llama-server`` with parallel slots and continuous batching behind the gateway's
    ``openai`` backend, against (c) the gateway's in-process ``llamacpp`` tier, on the same
    GGUF, the same prompts (~125 tokens with the chat template, all different so that no
    prompt cache helps), 128 output tokens, temperature 0, streaming, at concurrency 1, 2, 4
    and 8. Both go through a gateway (one worker), so the gateway's own cost is in both.

For every level: aggregate output tok/s (output tokens / wall time of the level), CPU-s per
output token (user+system time of every process in the gateway's session, plus the
llama-server's session for (b), over the level), estimated J/token (CPU-s x the estimated
meter's watts per busy core, ``EnergySpec.watts_per_core``), p50/p99 time to first token
(client side, to the first content delta). The levels alternate between the two targets so
that other load on the machine hits both alike; CPU used by processes outside the
benchmark during a level is recorded as ``other cores``. With ``--rounds N`` the whole
sequence of levels runs N times (the order of the two targets flips every level and every
round): the report gives each round's in-process / llama-server ratio and judges the
targets on the median over the rounds, since one round on a shared box can be off by 20%.

    .venv/bin/python benchmarks/llamacpp_anchor.py                  # 8 requests per level
    .venv/bin/python benchmarks/llamacpp_anchor.py --levels 1,4 --requests 4   # quick look
    .venv/bin/python benchmarks/llamacpp_anchor.py --skip-batched-bench --rounds 3

Threads: all three run a step of one token on ``--threads`` (default: half the cores) and a
step of several (a prompt, or several sequences at once) on ``--threads-batch`` (default:
every core): the in-process tier's own defaults (``n_threads``, ``n_threads_batch``), given to
the tools as ``-t`` and ``-tb``, so that tok/s and CPU-s/token compare like with like.

Writes ``benchmarks/results/llamacpp-anchor-<time>.md`` (tables, ratios in-process /
llama-server, the issue's targets) and keeps the processes' logs under
``benchmarks/results/runs/llamacpp-anchor-<time>/``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from backends.models import resolve_model_path
from policies.schema import EnergySpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SMALL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
TIER_MODEL = "qwen2.5-coder-0.5b-instruct"
KEY = "sk-bench-anchor"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROMPT_TOKENS = 125
OUTPUT_TOKENS = 128
TOPICS = ["a CSV parser", "an LRU cache", "a rate limiter", "a JSON diff", "a priority queue",
          "a URL router", "a retry decorator", "a tokenizer", "a matrix class", "a trie",
          "an event bus", "a ring buffer", "a date parser", "a graph search", "a text wrapper",
          "a config loader"]


def say(msg: str) -> None:
    print(f"llamacpp_anchor: {msg}", file=sys.stderr, flush=True)


def prompt(i: int) -> str:
    """Request ``i``'s user message: different from its first words on (no shared prefix
    beyond the chat template's), ~125 tokens with the template."""
    topic = TOPICS[i % len(TOPICS)]
    return (f"Request {i + 1}: write {topic} in Python. Give a complete module with a class, "
            "type hints and a docstring for every public method, then explain the design "
            "choices step by step: the data structures, the time and memory cost of each "
            "operation, the edge cases it handles (empty input, very large input, invalid "
            "values, concurrency), how errors are reported to the caller, and how you would "
            "test it with pytest. Finish with three example calls and their expected output. "
            "Be thorough and do not stop early.")


# -- processes and their CPU time ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_cpu_s(sid: int) -> float:
    """User + system CPU seconds of the live processes of session ``sid`` (every thread),
    with what they reaped of their children."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 (session), counted after the command name
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return (sum(parts[:8]) - idle) / CLOCK_TICKS


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Proc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        return self

    @property
    def sid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; its log "
                                 f"({self.log}):\n{self.log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise SystemExit(f"{self.name} did not answer {url} within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def tools_dir() -> Path:
    """Build (or find) llama-batched-bench and llama-server; their folder."""
    say("llama.cpp tools: scripts/build-llama-tools (a first build takes ~10 min)")
    out = subprocess.run([str(ROOT / "scripts" / "build-llama-tools")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1]).resolve()


def build_name() -> str:
    out = subprocess.run([sys.executable, str(ROOT / "backends" / "llamacpp_build.py"), "shell"],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return out.split(";")[0].split("=", 1)[1]


# -- (a) llama-batched-bench -------------------------------------------------------------------

def batched_bench(bench: Path, gguf: Path, levels: list[int], threads: int, threads_batch: int,
                  log: Path) -> list[dict[str, float]]:
    rows = []
    for pl in levels:
        say(f"llama-batched-bench: {pl} sequence(s) x ({PROMPT_TOKENS} prompt + "
            f"{OUTPUT_TOKENS} generated tokens)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        done = subprocess.run(
            [str(bench), "-m", str(gguf), "-c", str(pl * (PROMPT_TOKENS + OUTPUT_TOKENS) + 64),
             "-b", "2048", "-ub", "512", "-npp", str(PROMPT_TOKENS), "-ntg", str(OUTPUT_TOKENS),
             "-npl", str(pl), "-t", str(threads), "-tb", str(threads_batch),
             "--output-format", "jsonl"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log, "a") as f:
            f.write(done.stdout)
        lines = [json.loads(line) for line in done.stdout.splitlines()
                 if line.startswith("{") and '"speed_tg"' in line]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"llama-batched-bench failed ({done.returncode}); see {log}")
        row = lines[-1]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows.append({"pl": pl, "speed_pp": row["speed_pp"], "speed_tg": row["speed_tg"],
                     "speed": row["speed"], "t": row["t"], "wall": wall,
                     "cpu_per_token": cpu / (pl * OUTPUT_TOKENS)})
    return rows


# -- (b) and (c): the two tiers behind a gateway -----------------------------------------------

def gateway_policy(backend: dict[str, object], state: Path) -> dict[str, object]:
    return {
        "version": 1,
        "state_dir": str(state),
        "server": {"access_log": False},
        "backends": {"anchor": backend},
        "tiers": [{"name": "small", "backend": "anchor", "model": TIER_MODEL, "cost": 1.0}],
        "tenants": {"bench": {"keys": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()],
                              "default_tier": "small"}},
    }


def start_gateway(name: str, backend: dict[str, object], run: Path) -> tuple[Proc, str]:
    policy = run / f"{name}.yaml"
    policy.write_text(yaml.safe_dump(gateway_policy(backend, run / f"{name}-state"),
                                     sort_keys=False))
    port = free_port()
    gw = Proc(f"gateway ({name})", [sys.executable, "-m", "gateway.cli", "serve", "--policy",
                                    str(policy), "--port", str(port), "--workers", "1"],
              run / f"{name}-gateway.log")
    gw.start({**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    gw.wait_http(f"{url}/readyz", 300)
    return gw, url


@dataclass
class Result:
    ttft: float
    total: float
    completion_tokens: int
    prompt_tokens: int


async def one_request(client: httpx.AsyncClient, url: str, i: int) -> Result:
    body = {"model": "small", "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": OUTPUT_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft = None
    usage: dict[str, int] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {KEY}"}) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"request {i} to {url}: {resp.status_code} "
                             f"{(await resp.aread()).decode(errors='replace')[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"request {i} to {url}: error event {event['error']}")
            if ttft is None and any(c.get("delta", {}).get("content")
                                    for c in event.get("choices") or []):
                ttft = time.monotonic() - t0
            if event.get("usage"):
                usage = event["usage"]
    total = time.monotonic() - t0
    return Result(ttft if ttft is not None else total, total,
                  int(usage.get("completion_tokens", 0)), int(usage.get("prompt_tokens", 0)))


@dataclass
class Level:
    target: str
    concurrency: int
    requests: int
    wall: float
    output_tokens: int
    prompt_tokens: float
    cpu_gateway: float
    cpu_server: float
    other_cores: float
    ttft: list[float] = field(default_factory=list)
    round: int = 1

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall

    @property
    def cpu_per_token(self) -> float:
        return (self.cpu_gateway + self.cpu_server) / max(self.output_tokens, 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 8-16 samples, p99 is the slowest one)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


async def run_level(url: str, concurrency: int, requests: int, first: int) -> list[Result]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(first, first + requests):
        queue.put_nowait(i)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, i))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def measure(target: str, url: str, sids: tuple[int, int | None], concurrency: int,
            requests: int, first: int, round_: int) -> Level:
    gw_sid, server_sid = sids
    cpu_gw0 = session_cpu_s(gw_sid)
    cpu_sv0 = session_cpu_s(server_sid) if server_sid else 0.0
    busy0, self0, t0 = machine_busy_s(), self_cpu_s(), time.monotonic()
    results = asyncio.run(run_level(url, concurrency, requests, first))
    wall = time.monotonic() - t0
    cpu_gw = session_cpu_s(gw_sid) - cpu_gw0
    cpu_sv = (session_cpu_s(server_sid) - cpu_sv0) if server_sid else 0.0
    other = machine_busy_s() - busy0 - (self_cpu_s() - self0) - cpu_gw - cpu_sv
    level = Level(target, concurrency, requests, wall, sum(r.completion_tokens for r in results),
                  sum(r.prompt_tokens for r in results) / len(results), cpu_gw, cpu_sv,
                  max(other, 0.0) / wall, [r.ttft for r in results], round_)
    say(f"  {target:13s} c={concurrency} (round {round_}): {level.output_tokens} tokens in {wall:.1f} s = "
        f"{level.tok_s:.1f} tok/s, {level.cpu_per_token:.3f} CPU-s/token, "
        f"TTFT p50 {percentile(level.ttft, 50):.2f} s (other load: {level.other_cores:.2f} cores)")
    return level


# -- the report --------------------------------------------------------------------------------

def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI %s"],
                          stdout=subprocess.PIPE, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            "backends", "gateway"], stdout=subprocess.PIPE, text=True,
                           check=False).stdout.strip()
    return done.stdout.strip() + (" (+ uncommitted changes in backends/gateway)" if dirty else "")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def report(stamp: str, args: argparse.Namespace, bench_rows: list[dict[str, float]],
           levels: list[Level], watts: float, build: str) -> str:
    out = [f"# llama.cpp anchor: in-process tier vs llama-server vs llama-batched-bench ({stamp})",
           "",
           f"- Command: `.venv/bin/python benchmarks/llamacpp_anchor.py {' '.join(sys.argv[1:])}`",
           f"- Code: {git_commit()}",
           f"- Machine: {cpu_model()}, {os.cpu_count()} cores; llama.cpp build '{build}' "
           "(backends/llamacpp_build.py; llama-cpp-python 0.3.36 in-process, the same llama.cpp "
           "source for the tools)",
           f"- Model: {SMALL} (GGUF); prompts ~{PROMPT_TOKENS} tokens with the chat template, "
           f"{OUTPUT_TOKENS} output tokens, temperature 0, streaming; {args.threads} thread(s) "
           f"for a step of one token, {args.threads_batch} for a step of several (`-t`, `-tb`); "
           f"{max(args.levels)} slots of {args.ctx} tokens on both servers",
           f"- Energy estimate: CPU-s x {watts:g} W per busy core (the estimated meter's "
           "`watts_per_core`), no idle share",
           "- The CPU is shared with other jobs on this machine while this ran: `other cores` is "
           "the CPU they used during each level (cores busy on average); each row is one "
           f"short, bounded run, {args.rounds} round(s) of every level; the ratios and targets "
           "use the median over the rounds (load average at the end: "
           f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})",
           ""]
    out += ["## (a) llama-batched-bench: the batched-decode ceiling", "",
            "One process per batch size B; all B prompts are prefilled together, then B tokens "
            "per decode step. CPU-s/token: the process's CPU time (model load and prefill "
            "included) / generated tokens.", "",
            "| B | prefill tok/s | decode tok/s | overall tok/s | CPU-s/output token | est. J/output token |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in bench_rows:
        out.append(f"| {r['pl']:.0f} | {r['speed_pp']:.1f} | {r['speed_tg']:.1f} | "
                   f"{r['speed']:.1f} | {r['cpu_per_token']:.4f} | "
                   f"{r['cpu_per_token'] * watts:.3f} |")
    out += ["", "## (b) llama-server vs (c) the in-process tier, both behind the gateway", "",
            "Aggregate output tok/s = output tokens of the level / its wall time. CPU-s/token: "
            "the gateway's processes plus (llama-server) the server's, over the level / output "
            "tokens. TTFT: client side, to the first content delta.", "",
            "| target | c | round | requests | prompt tok | output tok | tok/s | CPU-s/tok "
            "(gateway + server) | est. J/tok | TTFT p50 s | TTFT p99 s | other cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        split = (f"{lv.cpu_per_token:.4f} ({lv.cpu_gateway / max(lv.output_tokens, 1):.4f} + "
                 f"{lv.cpu_server / max(lv.output_tokens, 1):.4f})")
        out.append(f"| {lv.target} | {lv.concurrency} | {lv.round} | {lv.requests} | "
                   f"{lv.prompt_tokens:.0f} | "
                   f"{lv.output_tokens} | {lv.tok_s:.1f} | {split} | "
                   f"{lv.cpu_per_token * watts:.3f} | {percentile(lv.ttft, 50):.2f} | "
                   f"{percentile(lv.ttft, 99):.2f} | {lv.other_cores:.2f} |")
    runs: dict[tuple[str, int], dict[int, Level]] = {}
    for lv in levels:
        runs.setdefault((lv.target, lv.concurrency), {})[lv.round] = lv

    def med(target: str, c: int, value: Callable[[Level], float]) -> float | None:
        got = runs.get((target, c))
        return statistics.median(value(lv) for lv in got.values()) if got else None

    def tok_s(lv: Level) -> float:
        return lv.tok_s

    def cpu_tok(lv: Level) -> float:
        return lv.cpu_per_token

    def ttft50(lv: Level) -> float:
        return percentile(lv.ttft, 50)

    rounds = sorted({lv.round for lv in levels})
    out += ["", "## Ratios in-process / llama-server (same run)", "",
            "Each round's ratio is of two levels run one after the other; `median` is the median "
            "of those ratios (tok/s), the other columns the ratio of the medians.", "",
            "| c | " + " | ".join(f"tok/s round {r}" for r in rounds) + " | tok/s median | "
            "CPU-s/token | TTFT p50 | in-process tok/s vs batched-bench decode |",
            "|---:|" + "---:|" * (len(rounds) + 4)]
    bench_by = {int(r["pl"]): r for r in bench_rows}
    within: list[tuple[int, float]] = []
    for c in args.levels:
        a, b = runs.get(("in-process", c), {}), runs.get(("llama-server", c), {})
        paired = [r for r in rounds if r in a and r in b]
        if not paired:
            continue
        ratios = {r: a[r].tok_s / b[r].tok_s for r in paired}
        median = statistics.median(ratios.values())
        within.append((c, median))
        a_tok, a_cpu, b_cpu = med("in-process", c, tok_s), med("in-process", c, cpu_tok), \
            med("llama-server", c, cpu_tok)
        a_ttft, b_ttft = med("in-process", c, ttft50), med("llama-server", c, ttft50)
        assert a_tok and a_cpu and b_cpu and a_ttft is not None and b_ttft is not None
        ceiling = (f"{a_tok / bench_by[c]['speed_tg']:.2f}" if c in bench_by else "-")
        out.append(f"| {c} | " + " | ".join(f"{ratios[r]:.2f}" if r in ratios else "-"
                                            for r in rounds)
                   + f" | {median:.2f} | {a_cpu / b_cpu:.2f} | {a_ttft / max(b_ttft, 1e-9):.2f} | "
                   f"{ceiling} |")
    out += ["", "## The issue's targets (issue 17)", "",
            f"Medians over {len(rounds)} round(s).", ""]
    for target in ("in-process", "llama-server"):
        one, four = med(target, 1, tok_s), med(target, 4, tok_s)
        cpu_one, cpu_four = med(target, 1, cpu_tok), med(target, 4, cpu_tok)
        if one and four and cpu_one and cpu_four:
            speed, cpu = four / one, cpu_four / cpu_one
            out.append(f"- {target}: c=4 tok/s = {speed:.2f}x c=1 (target >= 2x: "
                       f"{'met' if speed >= 2 else 'NOT met'}); CPU-s/token at c=4 = {cpu:.2f}x "
                       f"c=1 (target <= 0.6x: {'met' if cpu <= 0.6 else 'NOT met'})")
    if within:
        worst = min(r for _, r in within)
        out.append(f"- in-process within 10% of llama-server's tok/s at every concurrency: "
                   f"{'met' if worst >= 0.9 else 'NOT met'} (median ratios: "
                   + ", ".join(f"c={c} {r:.2f}" for c, r in within) + ")")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,2,4,8",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per level: max(this, concurrency)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="decode threads of all three (default: the in-process tier's "
                             "own default, half the cores)")
    parser.add_argument("--threads-batch", type=int, default=max(1, os.cpu_count() or 1),
                        help="threads for a step of several tokens (default: every core, the "
                             "in-process tier's own default)")
    parser.add_argument("--ctx", type=int, default=512, help="context tokens per slot")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every level this many times; targets on the median")
    parser.add_argument("--skip-batched-bench", action="store_true")
    parser.add_argument("--no-llama-server", action="store_true",
                        help="the in-process tier only (no llama.cpp tools needed with "
                             "--skip-batched-bench)")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run = RESULTS / "runs" / f"llamacpp-anchor-{stamp}"
    run.mkdir(parents=True, exist_ok=True)
    watts = EnergySpec().watts_per_core
    gguf = resolve_model_path(SMALL)
    tools_needed = not (args.skip_batched_bench and args.no_llama_server)
    bins = tools_dir() if tools_needed else Path()
    build = build_name()

    bench_rows = ([] if args.skip_batched_bench else
                  batched_bench(bins / "llama-batched-bench", gguf, args.levels, args.threads,
                                args.threads_batch,
                                run / "batched-bench.log"))
    slots = max(args.levels)
    server_port = free_port()
    server = Proc("llama-server", [
        str(bins / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
        "--port", str(server_port), "-np", str(slots), "-c", str(slots * args.ctx), "-cb",
        "-t", str(args.threads), "-tb", str(args.threads_batch), "--alias", TIER_MODEL,
        "--no-webui"],
        run / "llama-server.log")
    procs: list[Proc] = []
    try:
        targets: dict[str, tuple[str, tuple[int, int | None]]] = {}
        say("starting the in-process tier's gateway")
        local, local_url = start_gateway("in-process", {
            "kind": "llamacpp", "model": SMALL, "n_ctx": args.ctx, "slots": slots,
            "n_threads": args.threads, "n_threads_batch": args.threads_batch,
            "max_queue": 256, "queue_timeout_s": 900}, run)
        procs.append(local)
        targets["in-process"] = (local_url, (local.sid, None))
        if not args.no_llama_server:
            say(f"starting llama-server ({slots} slots, continuous batching) and its gateway")
            procs.append(server.start())
            server.wait_http(f"http://127.0.0.1:{server_port}/health", 300)
            remote, remote_url = start_gateway("llama-server", {
                "kind": "openai", "base_url": f"http://127.0.0.1:{server_port}/v1",
                "timeouts": {"first_byte_s": 900, "total_s": 3600}}, run)
            procs.append(remote)
            targets["llama-server"] = (remote_url, (remote.sid, server.sid))
        say("warming up (2 requests to each target)")
        for url, _ in targets.values():
            asyncio.run(run_level(url, 2, 2, 10_000))
        levels: list[Level] = []
        first = 0  # every request of the run has a prompt of its own
        for round_ in range(1, args.rounds + 1):
            for n, c in enumerate(args.levels):
                requests = max(args.requests, c)
                say(f"round {round_}/{args.rounds}, concurrency {c}: {requests} requests to "
                    "each target")
                order = list(targets) if (n + round_) % 2 else list(reversed(targets))
                for target in order:
                    url, sids = targets[target]
                    levels.append(measure(target, url, sids, c, requests, first, round_))
                first += requests
    finally:
        for p in reversed(procs):
            p.stop()
    levels.sort(key=lambda lv: (lv.target != "in-process", lv.concurrency, lv.round))
    text = report(stamp, args, bench_rows, levels, watts, build)
    path = RESULTS / f"llamacpp-anchor-{stamp}.md"
    path.write_text(text)
    print(text)
    say(f"wrote {path.relative_to(ROOT)}; logs in {run.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
