#!/usr/bin/env python3
"""Gateway overhead: joulegate (and optionally the LiteLLM proxy) against a fast fake upstream.

Self-contained: everything it runs is in this repository, plus ``wrk`` (``apt-get install -y
wrk``). It starts the fake upstream (``tests/fake_upstream.py``), measures requests sent to it
directly, then starts ``joulegate serve`` on a policy it writes and sends the same requests
through the gateway, non-streaming and streaming, at concurrency 1 and 32. It prints one table
(req/s, p50/p99 latency, the p50 latency the gateway adds over direct, the gateway's CPU ms per
request and memory) and writes it to ``benchmarks/results/overhead-<time>.md`` with the raw
runs beside it (``overhead-<time>.json``); the logs of the upstream and the gateways go to
``benchmarks/results/runs/overhead-<time>/``. Progress goes to stderr: a full run takes minutes.

    .venv/bin/python benchmarks/overhead.py                 # joulegate only
    .venv/bin/python benchmarks/overhead.py --litellm       # + LiteLLM, same run, same workers
    .venv/bin/python benchmarks/overhead.py --budgeted      # a joule budget in the path
    .venv/bin/python benchmarks/overhead.py --full-path --litellm   # what a routed tenant takes
    # before/after in one run on a shared box: another tree of the project, measured in turns
    .venv/bin/python benchmarks/overhead.py --full-path --litellm --interleave \
        --baseline-code /tmp/before   # (git archive <commit> gateway backends policies | tar -x -C /tmp/before)
    .venv/bin/python benchmarks/overhead.py --duration 5 --repeats 1   # quick look

Method:

* Pinning: the gateway gets CPU 0 to itself; the fake upstream and wrk share CPU 1
  (``--proxy-cpus``, ``--load-cpus``; '' leaves a side unpinned, as does a box where those
  CPUs are not available). The gateway's numbers therefore mean "one dedicated core".
* Load: wrk with ``benchmarks/loadgen/chat.lua``, one thread, one keep-alive connection per
  unit of concurrency, closed loop (each connection sends its next request when the answer is
  complete). The request is a 127 B chat completion with ``max_tokens`` 16 and a bearer key;
  streamed answers are timed to their last byte (wrk cannot time the first event). wrk only
  counts status codes, so one answer per target and mode is checked (a ``chat.completion``, or
  an event stream ending in ``[DONE]``) before it is measured.
* Order: the upstream alone first, then each gateway; before each target and mode,
  ``--warmup`` seconds of unrecorded load at the highest concurrency, then ``--repeats`` runs
  of ``--duration`` seconds per concurrency. A row is the mean over its repeats.
* CPU: the gateway runs in a session of its own, so all its processes (workers included) are
  the processes of that session; CPU ms per request is their user+system time (with that of
  children they reaped) from ``/proc/<pid>/stat`` over a run, divided by the requests wrk
  completed. RSS is the sum over the same processes after the run. CPU used during a run by
  processes outside the benchmark is recorded as ``other_cores`` (noise from other jobs).
* ``--full-path``: the path a real tenant takes. Two tiers (``small``, cost 1, and ``large``,
  cost 4, two ``openai`` backends on the same fake upstream); the request asks for
  ``model: "auto"``, so every request is scored by the ``learned`` difficulty estimator and
  gated (threshold 0 on ``large``); ``large`` has a capacity of half the tenant's requests
  (so about every other request takes it and the other half is demoted to ``small``: both
  tiers serve); the tenant has a joule budget on the embedded SQLite ledger (reserve before,
  settle after, every request); fallback on. The row is labelled ``joulegate (full path)``.
  The plain path (``joulegate``) is measured in the same run before it, unless ``--no-plain``.
* ``--cascade``: the full path with ``routing.estimator: cascade`` instead (the answer
  signal, ``probe_tokens: 2``, ``threshold: 0``): every request starts as a stream with
  log-probabilities on ``small``, whose first two tokens are read and buffered before the
  answer is passed on (the fake upstream sends log-probabilities when asked). Nothing
  escalates, so the row is the cascade's own cost, not a second tier's answer. Labelled
  ``joulegate (cascade)``.
* With ``--litellm`` the LiteLLM proxy (``litellm[proxy]``, a pinned release, ``--litellm-spec``;
  in a venv created on first use under ``${TMPDIR:-/tmp}/bench-venvs/litellm``, which takes
  minutes) runs on a config written here, the same way as joulegate: one
  ``openai/fake-model`` deployment on the fake upstream, no cache, no database.

Run it on a committed tree (a ``git worktree`` with its own venv): it measures whatever code
its venv imports; the report records the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CHAT_LUA = ROOT / "benchmarks" / "loadgen" / "chat.lua"
FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
KEY = "sk-bench-joulegate"
LITELLM_KEY = "sk-bench-litellm"
MODEL = "fake-model"
UPSTREAM_PORT = 18080
PROMPT = "Say hello in one short sentence."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
READY_TIMEOUT_S = {"joulegate": 60.0, "litellm": 240.0}
# The LiteLLM release measured by default: pinned, so that runs compare like with like and a
# fresh venv never picks up an unvetted release (1.107.0 was a compromised one).
LITELLM_SPEC = "litellm[proxy]==1.106.2"


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


#: The routing of each routed path (see the module's doc).
ROUTING = {
    "full": "  estimator: learned\n  thresholds: {large: 0.0}\n",
    "cascade": "  estimator: cascade\n  cascade: {threshold: 0.0, probe_tokens: 2, to: large}\n",
}
#: Each path's row label and file name.
PATHS = {"plain": ("joulegate", "joulegate"),
         "full": ("joulegate (full path)", "joulegate-full"),
         "cascade": ("joulegate (cascade)", "joulegate-cascade")}


def policy_yaml(budgeted: bool = False, upstream_port: int = UPSTREAM_PORT,
                state_dir: Path = RESULTS / "runs" / "state", path: str = "plain") -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    budget = ("\n    budgets: [{window: 1d, joules: 1.0e12}]" if budgeted or path != "plain"
              else "")
    if path != "plain":
        return f"""version: 1
state_dir: {state_dir}
backends:
  small:
    kind: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
  large:
    kind: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
tiers:
  - {{name: small, backend: small, model: {MODEL}, cost: 1}}
  - {{name: large, backend: large, model: {MODEL}-large, cost: 4}}
routing:
{ROUTING[path]}  capacity: {{large: {{fraction: 0.5, by: requests, window_s: 60}}}}
  fallback: auto
tenants:
  bench:
    keys: ["sha256:{digest}"]
    default_tier: small{budget}
"""
    return f"""version: 1
state_dir: {state_dir}
backends:
  fake:
    kind: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
tiers:
  - {{name: fake, backend: fake, model: {MODEL}, cost: 1}}
tenants:
  bench:
    keys: ["sha256:{digest}"]
    default_tier: fake{budget}
"""


def litellm_config(upstream_port: int) -> str:
    return f"""# benchmarks/overhead.py: one deployment on the fake upstream, no cache, no DB
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: not-checked-by-the-fake-upstream
litellm_settings:
  cache: false
  telemetry: false
  request_timeout: 600
general_settings:
  master_key: {LITELLM_KEY}
"""


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_cpus(cmd: list[str], cpus: str) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def cpu_set(spec: str) -> set[int]:
    """'0', '0-3', '0,2' -> the CPU numbers."""
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


class Service:
    """A server this benchmark started, in a session of its own: its session id is its pid,
    every process it forks stays in that session, and it is stopped as a process group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, cpus: str = "",
                 env: dict[str, str] | None = None):
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(on_cpus(cmd, cpus), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace_s:.0f} s of SIGTERM: SIGKILL")
        if session_pids(self.pid):  # the leader is gone but some of its processes are not
            self._signal(signal.SIGKILL)
        if self.alive():
            self.proc.wait(5)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def proc_stats() -> dict[int, tuple[int, int, int]]:
    """pid -> (session id, CPU ticks incl. reaped children, RSS bytes) of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # after "pid (comm) ": state ppid pgrp session ... utime stime cutime cstime ... rss
        fields = raw[raw.rindex(b")") + 2:].split()
        try:
            out[int(entry.name)] = (int(fields[3]), sum(int(v) for v in fields[11:15]),
                                    int(fields[21]) * PAGE_BYTES)
        except (IndexError, ValueError):
            continue
    return out


def session_pids(sid: int) -> list[int]:
    return [pid for pid, (s, _, _) in proc_stats().items() if s == sid]


def session_usage(stats: dict[int, tuple[int, int, int]], sid: int | None) -> tuple[int, int]:
    """(CPU ticks, RSS bytes) summed over the processes of session ``sid``."""
    if sid is None:
        return 0, 0
    ticks = rss = 0
    for s, t, r in stats.values():
        if s == sid:
            ticks, rss = ticks + t, rss + r
    return ticks, rss


def busy_ticks() -> int:
    """CPU ticks spent by the whole machine, all CPUs (user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


# ---------------------------------------------------------------- requests

def request_body(stream: bool, model: str = MODEL) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": 16, "stream": stream}, separators=(",", ":")).encode()


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def check_answer(base_url: str, key: str, stream: bool, model: str = MODEL) -> None:
    """One request as wrk will send it; raise ValueError unless the answer is a well-formed
    chat completion (or, streaming, an event stream of chunks ending in [DONE])."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{base_url}/chat/completions", request_body(stream, model),
                                 headers)
    try:
        with NO_PROXY.open(req, timeout=10) as resp:
            ctype, text = resp.headers.get("Content-Type", ""), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        raise ValueError(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
    if stream:
        if ("text/event-stream" not in ctype or "chat.completion.chunk" not in text
                or "data: [DONE]" not in text):
            raise ValueError(f"not a chat completion stream ({ctype}): {text[:300]}")
    else:
        try:
            ok = json.loads(text).get("object") == "chat.completion"
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(f"not a chat completion: {text[:300]}")


def wait_ready(service: Service, base_url: str, key: str, timeout_s: float) -> float:
    """Seconds until ``service`` answered a chat completion; exit if it dies or never does."""
    t0 = time.monotonic()
    last = "no answer yet"
    while True:
        if not service.alive():
            sys.exit(f"{service.name} exited before it was ready; last lines of "
                     f"{service.log_path}:\n{service.tail()}")
        try:
            check_answer(base_url, key, stream=False)
            return time.monotonic() - t0
        except (OSError, ValueError) as e:
            last = str(e)
        if time.monotonic() - t0 > timeout_s:
            sys.exit(f"{service.name} not ready after {timeout_s:.0f} s ({last}); last lines of "
                     f"{service.log_path}:\n{service.tail()}")
        time.sleep(0.25)


def wait_upstream_port(service: Service, timeout_s: float = 30.0) -> int:
    """The port from the fake upstream's ``READY <port>`` line."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        for line in service.log_path.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return int(line.split()[1])
        if not service.alive():
            break
        time.sleep(0.1)
    sys.exit(f"the fake upstream did not print READY; last lines of {service.log_path}:\n"
             f"{service.tail()}")


# ---------------------------------------------------------------- load

def run_wrk(url: str, conns: int, seconds: int, key: str, stream: bool, cpus: str,
            model: str = MODEL) -> dict:
    env = {**os.environ, "CHAT_MODEL": model, "CHAT_KEY": key,
           "CHAT_STREAM": "1" if stream else "0",
           "CHAT_PROMPT": PROMPT, "CHAT_MAX_TOKENS": "16"}
    cmd = on_cpus(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
                   "-s", str(CHAT_LUA), url], cpus)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"chat_lua"')]
    if done.returncode != 0 or not lines:
        sys.exit(f"wrk failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])


def measure(target: str, url: str, key: str, stream: bool, conns: int, seconds: int,
            gateway: Service | None, upstream: Service, load_cpus: str,
            model: str = MODEL) -> dict:
    """One recorded wrk run, with the CPU and memory of the gateway over it."""
    gw_sid = gateway.pid if gateway else None
    stats0, busy0, wall0 = proc_stats(), busy_ticks(), time.monotonic()
    children0, self0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    result = run_wrk(url, conns, seconds, key, stream, load_cpus, model)
    stats1, busy1, wall = proc_stats(), busy_ticks(), time.monotonic() - wall0
    children1, self1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    gw_ticks = session_usage(stats1, gw_sid)[0] - session_usage(stats0, gw_sid)[0]
    up_ticks = session_usage(stats1, upstream.pid)[0] - session_usage(stats0, upstream.pid)[0]
    # wrk is the only child this process reaps during the run
    wrk_ticks = ((children1.ru_utime + children1.ru_stime)
                 - (children0.ru_utime + children0.ru_stime)) * CLOCK_TICKS
    self_ticks = ((self1.user + self1.system) - (self0.user + self0.system)) * CLOCK_TICKS
    other = max(0.0, (busy1 - busy0) - gw_ticks - up_ticks - wrk_ticks - self_ticks)
    span = wall * CLOCK_TICKS
    requests = result["requests"]
    result.update({
        "target": target, "mode": "stream" if stream else "json", "conns": conns,
        "wall_s": round(wall, 3),
        "gateway_cpu_ms_per_req": (round(gw_ticks / CLOCK_TICKS * 1000 / requests, 4)
                                   if gateway and requests else None),
        "gateway_cores": round(gw_ticks / span, 3) if gateway else None,
        "gateway_rss_mb": (round(session_usage(stats1, gw_sid)[1] / 2**20, 1)
                           if gateway else None),
        "upstream_cpu_ms_per_req": (round(up_ticks / CLOCK_TICKS * 1000 / requests, 4)
                                    if requests else None),
        "upstream_cores": round(up_ticks / span, 3),
        "wrk_cores": round(wrk_ticks / span, 3),
        "other_cores": round(other / span, 3),
        "time": time.strftime("%H:%M:%S"),
    })
    return result


def measure_target(target: str, base_url: str, key: str, stream: bool, args: argparse.Namespace,
                   upstream: Service, gateway: Service | None = None,
                   model: str = MODEL) -> list[dict]:
    mode = "stream" if stream else "json"
    try:
        check_answer(base_url, key, stream, model)
    except (OSError, ValueError) as e:
        sys.exit(f"{target} {mode}: the answer checked before measuring is wrong: {e}")
    url = f"{base_url}/chat/completions"
    if args.warmup > 0:
        log(f"{target} {mode}: warm-up {args.warmup} s at c={max(args.concurrency)}")
        run_wrk(url, max(args.concurrency), args.warmup, key, stream, args.load_cpus, model)
    runs = []
    for rep in range(1, args.repeats + 1):
        for conns in args.concurrency:
            time.sleep(0.5)
            r = measure(target, url, key, stream, conns, args.duration, gateway, upstream,
                        args.load_cpus, model)
            r["rep"] = rep
            runs.append(r)
            cpu = (f"  CPU {r['gateway_cpu_ms_per_req']:.3f} ms/req"
                   if r["gateway_cpu_ms_per_req"] is not None else "")
            log(f"{target} {mode} c={conns} run {rep}/{args.repeats}: {r['rps']:,.1f} req/s  "
                f"p50 {r['p50_ms']:.3f}  p99 {r['p99_ms']:.3f} ms{cpu}  errors {r['error_total']}  "
                f"other load {r['other_cores']:.2f} cores")
            if r["error_total"]:
                log(f"  WARNING: {r['error_total']} errors {r['errors']}")
    return runs


def measure_interleaved(gateways: list[tuple[Service, str, str, str]], stream: bool,
                        args: argparse.Namespace, upstream: Service) -> list[dict[str, Any]]:
    """``--interleave``: every gateway is up at once; each repeat and concurrency measures
    them one after another, so a burst of load from other jobs falls on all of them alike
    and same-run ratios stay meaningful on a shared machine."""
    mode = "stream" if stream else "json"
    for gateway, base_url, key, model in gateways:
        try:
            check_answer(base_url, key, stream, model)
        except (OSError, ValueError) as e:
            sys.exit(f"{gateway.name} {mode}: the answer checked before measuring is wrong: {e}")
        if args.warmup > 0:
            log(f"{gateway.name} {mode}: warm-up {args.warmup} s at c={max(args.concurrency)}")
            run_wrk(f"{base_url}/chat/completions", max(args.concurrency), args.warmup, key,
                    stream, args.load_cpus, model)
    runs: list[dict[str, Any]] = []
    for rep in range(1, args.repeats + 1):
        for conns in args.concurrency:
            for gateway, base_url, key, model in gateways:
                time.sleep(0.5)
                r = measure(gateway.name, f"{base_url}/chat/completions", key, stream, conns,
                            args.duration, gateway, upstream, args.load_cpus, model)
                r["rep"] = rep
                runs.append(r)
                log(f"{gateway.name} {mode} c={conns} run {rep}/{args.repeats}: "
                    f"{r['rps']:,.1f} req/s  p50 {r['p50_ms']:.3f}  p99 {r['p99_ms']:.3f} ms  "
                    f"CPU {r['gateway_cpu_ms_per_req']:.3f} ms/req  errors {r['error_total']}  "
                    f"other load {r['other_cores']:.2f} cores")
    return runs


# ---------------------------------------------------------------- gateways

def start_joulegate(args: argparse.Namespace, run_dir: Path, upstream_port: int,
                    path: str = "plain", code: str = "") -> tuple[Service, str, str, str]:
    """``joulegate serve`` on a policy written here: the ``plain`` path (one tier, the model
    pinned), or a routed, budgeted one, ``full`` or ``cascade`` (see the module docstring).
    ``code``: a tree of the project whose packages it imports instead (``--baseline-code``)."""
    exe = Path(sys.executable).parent / "joulegate"
    if not exe.exists():
        sys.exit(f"no joulegate next to {sys.executable}: run this with the project's venv "
                 "(.venv/bin/python benchmarks/overhead.py)")
    label, slug = PATHS[path]
    if path == "plain" and args.budgeted:
        label = slug = "joulegate+budget"
    env = None
    if code:
        label, slug = f"{label} [baseline]", f"{slug}-baseline"
        env = {**os.environ, "PYTHONPATH": code}
    policy = run_dir / f"{slug}-policy.yaml"
    policy.write_text(policy_yaml(args.budgeted, upstream_port, run_dir / f"{slug}-state",
                                  path))
    port = free_port()
    cmd = [str(exe), "serve", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers)]  # default logging: one access record per request
    service = Service(label, cmd, run_dir / f"{slug}.log", args.proxy_cpus, env)
    return service, f"http://127.0.0.1:{port}/v1", KEY, MODEL if path == "plain" else "auto"


def ensure_litellm(venv: Path, spec: str = LITELLM_SPEC) -> str:
    """The LiteLLM venv (created on first use); returns LiteLLM's version."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        log(f"creating the LiteLLM venv at {venv} (first use: pip install '{spec}', minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip()


def start_litellm(args: argparse.Namespace, run_dir: Path,
                  upstream_port: int) -> tuple[Service, str, str, str]:
    venv = Path(args.litellm_venv)
    config = run_dir / "litellm-config.yaml"
    config.write_text(litellm_config(upstream_port))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "PYTHONPATH")}
    env.update({"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"})  # no cost map fetched from the network
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", str(args.workers)]
    service = Service("litellm", cmd, run_dir / "litellm.log", args.proxy_cpus, env)
    return service, f"http://127.0.0.1:{port}/v1", LITELLM_KEY, MODEL


# ---------------------------------------------------------------- report

def summarize(runs: list[dict]) -> dict[tuple[str, str, int], dict]:
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["mode"], r["conns"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        cpu = [r["gateway_cpu_ms_per_req"] for r in rs if r["gateway_cpu_ms_per_req"] is not None]
        rss = [r["gateway_rss_mb"] for r in rs if r["gateway_rss_mb"] is not None]
        out[key] = {
            "runs": len(rs),
            "rps": statistics.mean(r["rps"] for r in rs),
            "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
            "p50_ms": statistics.mean(r["p50_ms"] for r in rs),
            "p99_ms": statistics.mean(r["p99_ms"] for r in rs),
            "cpu_ms_per_req": statistics.mean(cpu) if cpu else None,
            "rss_mb": max(rss) if rss else None,
            "errors": sum(r["error_total"] for r in rs),
            "other_cores": statistics.mean(r["other_cores"] for r in rs),
        }
    return out


def table(summary: dict[tuple[str, str, int], dict], targets: list[str], modes: list[str],
          concs: list[int], workers: int) -> tuple[str, list[str]]:
    plural = "" if workers == 1 else "s"
    lines = [f"| target ({workers} worker{plural}) | mode | conc | req/s | p50 ms | p99 ms "
             "| p99/p50 | added p50 ms | CPU ms/req | RSS MB | x LiteLLM req/s | errors |",
             "|" + "---|" * 12]
    notes = []
    for mode in modes:
        for conc in concs:
            direct = summary.get(("direct", mode, conc))
            litellm = summary.get(("litellm", mode, conc))
            for target in targets:
                row = summary.get((target, mode, conc))
                if row is None:
                    continue
                rps = f"{row['rps']:,.0f}"
                if row["runs"] > 1:
                    rps += f" ({row['rps_min']:,.0f}-{row['rps_max']:,.0f})"
                ratio = "-"
                if litellm and target not in ("direct", "litellm") and litellm["rps"] > 0:
                    ratio = f"{row['rps'] / litellm['rps']:.1f}"
                tail = f"{row['p99_ms'] / row['p50_ms']:.1f}" if row["p50_ms"] > 0 else "-"
                if target == "direct":
                    name, added, cpu, rss = "direct (upstream)", "-", "-", "-"
                else:
                    name = target
                    added = f"{row['p50_ms'] - direct['p50_ms']:.3f}" if direct else "-"
                    cpu = (f"{row['cpu_ms_per_req']:.3f}" if row["cpu_ms_per_req"] is not None
                           else "-")
                    rss = f"{row['rss_mb']:.0f}" if row["rss_mb"] is not None else "-"
                    if direct and row["rps"] > 0.5 * direct["rps"]:
                        notes.append(f"{target} {mode} c={conc} reaches more than half the direct "
                                     "req/s: the upstream or wrk may be the bottleneck")
                if row["errors"]:
                    notes.append(f"{target} {mode} c={conc}: {row['errors']} errors "
                                 "(see the raw runs)")
                lines.append(f"| {name} | {mode} | {conc} | {rps} | {row['p50_ms']:.3f} | "
                             f"{row['p99_ms']:.3f} | {tail} | {added} | {cpu} | {rss} | {ratio} "
                             f"| {row['errors']} |")
    return "\n".join(lines), notes


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True,
                               text=True, check=False).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---------------------------------------------------------------- main

def resolve_pinning(args: argparse.Namespace) -> None:
    """Keep the pinning only where taskset exists and the CPUs are ours to use."""
    if not (args.proxy_cpus or args.load_cpus):
        return
    allowed = os.sched_getaffinity(0)
    wanted = cpu_set(args.proxy_cpus) | cpu_set(args.load_cpus)
    if shutil.which("taskset") is None:
        why = "taskset not found (util-linux)"
    elif not wanted <= allowed:
        why = f"CPUs {sorted(wanted - allowed)} are not available (allowed: {sorted(allowed)})"
    elif cpu_set(args.proxy_cpus) & cpu_set(args.load_cpus):
        why = None
        log("note: the gateway's CPUs overlap those of the upstream and wrk")
    else:
        why = None
    if why:
        log(f"not pinning: {why}; the gateway shares its CPUs with the upstream and wrk")
        args.proxy_cpus = args.load_cpus = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=int, default=15, help="seconds per recorded run")
    parser.add_argument("--repeats", type=int, default=2, help="recorded runs per row")
    parser.add_argument("--warmup", type=int, default=5,
                        help="seconds of unrecorded load before each target and mode (0: none)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                        help="wrk connections, one row each")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure streaming requests")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--budgeted", action="store_true",
                        help="give the tenant a joule budget (embedded ledger in the path)")
    parser.add_argument("--full-path", action="store_true",
                        help="also measure the full path: model auto routed over 2 tiers with a "
                             "capacity window, a joule budget on the embedded ledger")
    parser.add_argument("--cascade", action="store_true",
                        help="also measure the cascade's path: the full path with estimator "
                             "cascade, every probe accepted")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="with --full-path or --cascade, measure the plain path too")
    parser.add_argument("--interleave", action="store_true",
                        help="start every gateway first and measure them in turns, each repeat "
                             "and concurrency (for a machine shared with other jobs)")
    parser.add_argument("--baseline-code", default="", metavar="DIR",
                        help="also measure joulegate importing its packages from DIR (another "
                             "tree of the project, e.g. from git archive): before/after in one "
                             "run, with one venv")
    parser.add_argument("--litellm", action="store_true", help="also measure the LiteLLM proxy")
    parser.add_argument("--litellm-venv", default=str(Path(os.environ.get("TMPDIR") or "/tmp")
                                                      / "bench-venvs" / "litellm"),
                        help="its venv, created on first use")
    parser.add_argument("--litellm-spec", default=LITELLM_SPEC,
                        help="what pip installs into a new LiteLLM venv")
    parser.add_argument("--proxy-cpus", default="0",
                        help="taskset CPUs of the gateway ('': unpinned)")
    parser.add_argument("--load-cpus", default="1",
                        help="taskset CPUs of the fake upstream and wrk ('': unpinned)")
    parser.add_argument("--upstream-workers", type=int, default=1)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="the fake upstream's simulated model time per request")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--duration, --repeats and --workers must be at least 1, --warmup at least 0")
    if min(args.concurrency) < 1:
        parser.error("--concurrency values must be at least 1")
    args.concurrency = sorted(set(args.concurrency))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    for needed in (FAKE_UPSTREAM, CHAT_LUA):
        if not needed.exists():
            sys.exit(f"missing {needed.relative_to(ROOT)}")
    resolve_pinning(args)
    litellm_version = (ensure_litellm(Path(args.litellm_venv), args.litellm_spec)
                       if args.litellm else None)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS / "runs" / f"overhead-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    modes = [False, True] if args.stream else [False]
    services: list[Service] = []
    runs: list[dict] = []
    ready_s: dict[str, float] = {}
    targets = ["direct"]
    started = time.strftime("%Y-%m-%d %H:%M")

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        log(f"starting the fake upstream ({args.upstream_workers} worker(s), CPUs "
            f"'{args.load_cpus}'); logs in {run_dir.relative_to(ROOT)}")
        upstream = Service("fake upstream", [sys.executable, str(FAKE_UPSTREAM), "--port", "0",
                                             "--workers", str(args.upstream_workers),
                                             "--delay-ms", str(args.delay_ms)],
                           run_dir / "upstream.log", args.load_cpus)
        services.append(upstream)
        upstream_port = wait_upstream_port(upstream)
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        wait_ready(upstream, upstream_url, "", 10)
        for stream in modes:
            runs += measure_target("direct", upstream_url, "", stream, args, upstream)

        routed = [p for p, on in (("full", args.full_path), ("cascade", args.cascade)) if on]
        joulegates = ["plain"] if args.plain or not routed else []
        joulegates += routed
        starters: list[Callable[[argparse.Namespace, Path, int],
                                tuple[Service, str, str, str]]] = [
            functools.partial(start_joulegate, path=path, code=code)
            for code in ([args.baseline_code] if args.baseline_code else []) + [""]
            for path in joulegates]
        starters += [start_litellm] if args.litellm else []
        started_all: list[tuple[Service, str, str, str]] = []
        for start in starters:
            gateway, base_url, key, model = start(args, run_dir, upstream_port)
            services.append(gateway)
            log(f"starting {gateway.name} ({args.workers} worker(s), CPUs '{args.proxy_cpus}')")
            ready_s[gateway.name] = wait_ready(gateway, base_url, key,
                                               READY_TIMEOUT_S["litellm" if start is start_litellm
                                                               else "joulegate"])
            log(f"{gateway.name} answered after {ready_s[gateway.name]:.1f} s")
            targets.append(gateway.name)
            if args.interleave:  # all stay up (idle between their runs), measured in turns
                started_all.append((gateway, base_url, key, model))
                continue
            for stream in modes:
                runs += measure_target(gateway.name, base_url, key, stream, args, upstream, gateway,
                                       model)
            log(f"stopping {gateway.name}")
            gateway.stop()
        for stream in modes if args.interleave else []:
            runs += measure_interleaved(started_all, stream, args, upstream)
    finally:
        for service in reversed(services):
            service.stop()

    summary = summarize(runs)
    mode_names = ["json", "stream"] if args.stream else ["json"]
    text, notes = table(summary, targets, mode_names, args.concurrency, args.workers)
    other = statistics.mean(r["other_cores"] for r in runs)
    if other > 0.2:
        notes.append(f"other processes used {other:.2f} cores on average during the runs: "
                     "the numbers are noisy")
    pinning = (f"gateway pinned to CPUs '{args.proxy_cpus}', the fake upstream and wrk to "
               f"CPUs '{args.load_cpus}'" if args.proxy_cpus or args.load_cpus
               else "nothing pinned")
    body_bytes = runs[0]["request_bytes"] if runs else 0
    versions = f"joulegate {package_version('joulegate')} (commit {git_commit()})"
    if args.baseline_code:
        versions += f"; [baseline] rows import the gateway from {args.baseline_code}"
    if litellm_version:
        versions += f", LiteLLM {litellm_version}"
    report = (f"# Gateway overhead, {started}\n\n"
              f"{os.cpu_count()} cores ({cpu_model()}); {pinning}; {args.duration} s x "
              f"{args.repeats} run(s) per row after {args.warmup} s warm-up; wrk 1 thread, one "
              f"keep-alive connection per unit of concurrency; request: {body_bytes} B chat "
              f"completion, max_tokens 16; fake upstream: {args.upstream_workers} worker(s), "
              f"{args.delay_ms:g} ms delay; {versions}"
              + ("; tenant with a joule budget" if args.budgeted else "")
              + ("; gateways measured in turns (--interleave)" if args.interleave else "")
              + ("; full path: model auto over 2 tiers (learned estimator, capacity 0.5 of "
                 "requests on the costlier), joule budget on the embedded ledger"
                 if args.full_path else "")
              + ("; cascade: the full path with estimator cascade (answer signal, 2 probe "
                 "tokens, threshold 0: every probe accepted)" if args.cascade else "")
              + ". The CPU is shared with other jobs on this machine: compare rows of the "
                "same run (ratios), not across runs.\n\n"
              + text + "\n"
              + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"overhead-{stamp}.md"
    out.write_text(report)
    raw = {"started": started, "args": dict(vars(args)), "versions": versions,
           "ready_s": ready_s, "cores": os.cpu_count(), "cpu": cpu_model(),
           "summary": [{"target": t, "mode": m, "conns": c, **row}
                       for (t, m, c), row in summary.items()],
           "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)
    print(f"written to {out.relative_to(ROOT)} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
