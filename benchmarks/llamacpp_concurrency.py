#!/usr/bin/env python3
"""Concurrency on the in-process llama.cpp backend: tokens/s, CPU-s and estimated J per token.

Drives ``backends.llamacpp.LlamaCppBackend`` directly (no HTTP, no gateway) at concurrency
1, 2 and 4: each of the c requests is the same chat prompt of about 125 tokens (behind a
short tag of its own, so every request reads its whole prompt: no prefix-cache hits),
``max_tokens`` 128, temperature 0, streamed. Per run it measures:

* aggregate output tok/s: completion tokens of all c requests / wall time of the run;
* CPU-s per output token: this process's CPU time (all threads) over the run / tokens;
* estimated J per output token: what the gateway's CPU-time estimate (``meter: estimated``,
  ``watts_per_core`` W per busy core-second + ``idle_watts`` W) charges, read through the
  gateway's own attribution (:class:`gateway.energy.attribution.EnergyDevice` with a
  :class:`gateway.energy.estimated.CpuTimeMeter`); the per-request shares are summed and
  checked against the meter (``attributed/meter`` must be 1);
* p50 time to first token over the run's requests.

Variants run in the same process, interleaved (every repeat runs every concurrency of every
variant before the next repeat), so their ratios come from the same conditions:

    .venv/bin/python benchmarks/llamacpp_concurrency.py                  # this backend
    .venv/bin/python benchmarks/llamacpp_concurrency.py --repeats 3 \\
        --variant 'one context per slot, 1 thread each:module=/tmp/old_llamacpp.py,slots=2,threads=1'

``--variant LABEL:key=value,...`` adds a variant: ``module`` (a file holding another version
of the backend module, e.g. ``git show <rev>:backends/llamacpp.py > /tmp/old_llamacpp.py``),
``slots``, ``threads``. The default variant is this tree's backend with ``slots`` = the
highest concurrency. The CPU is shared with other jobs on this machine: the table gives the
median and the spread (min-max) over the repeats, and the CPU the rest of the machine used
during the runs (``other cores``).

Results: a table on stdout and ``benchmarks/results/llamacpp-concurrency-<stamp>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import GenerationRequest  # noqa: E402
from gateway.energy.attribution import Attribution, EnergyDevice  # noqa: E402
from gateway.energy.estimated import CpuTimeMeter  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
#: About 125 prompt tokens with Qwen's chat template (the tag and the system prompt included).
PROMPT = ("Write a complete Python module for a small library inventory system. It should "
          "define a Book dataclass with title, author, isbn and year, a Library class that "
          "can add, remove, search by author, search by title prefix and list books sorted "
          "by year, and a command line interface using argparse with subcommands for each "
          "operation. Include docstrings for every function and class.")


@dataclass
class Variant:
    label: str
    module: ModuleType
    slots: int
    threads: int | None
    backend: Any = None


@dataclass
class Run:
    variant: str
    concurrency: int
    wall_s: float
    tokens: int
    prompt_tokens: int
    cpu_s: float
    meter_j: float
    attributed_j: float
    ttft_s: list[float] = field(default_factory=list)
    other_cores: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def cpu_per_token(self) -> float:
        return self.cpu_s / self.tokens

    @property
    def j_per_token(self) -> float:
        return self.meter_j / self.tokens


def load_module(path: str | None) -> ModuleType:
    if path is None:
        return importlib.import_module("backends.llamacpp")
    spec = importlib.util.spec_from_file_location("backends._bench_llamacpp", path,
                                                  submodule_search_locations=None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "backends"  # its relative imports resolve against this tree
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str, default_slots: int) -> Variant:
    label, _, spec = text.partition(":")
    opts = dict(part.split("=", 1) for part in spec.split(",") if part)
    unknown = set(opts) - {"module", "slots", "threads"}
    if unknown:
        raise SystemExit(f"--variant {text!r}: unknown keys {sorted(unknown)}")
    return Variant(label, load_module(opts.get("module")),
                   int(opts.get("slots", default_slots)),
                   int(opts["threads"]) if "threads" in opts else None)


def busy_jiffies() -> tuple[float, float]:
    """(all CPUs' busy seconds, this process's CPU seconds) now."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / hz, time.process_time()


async def one(backend: Any, tag: int, max_tokens: int, device: EnergyDevice,
              weights: Attribution, started: float) -> tuple[int, int, float, float]:
    request = GenerationRequest(model="m", messages=[
        {"role": "user", "content": f"[{tag}] {PROMPT}"}], max_tokens=max_tokens,
        temperature=0, seed=1)
    share = device.open(request.progress, 1.0, weights)
    ttft = -1.0
    try:
        async for chunk in backend.stream(request):
            if ttft < 0 and chunk.text:
                ttft = time.perf_counter() - started
    finally:
        joules = device.close_share(share)
    return request.progress.completion_tokens, request.progress.prompt_tokens, ttft, joules


async def run_once(variant: Variant, c: int, max_tokens: int, tag0: int, watts: float,
                   idle_watts: float, prefill_weight: float) -> Run:
    meter = CpuTimeMeter(watts, idle_watts)
    device = EnergyDevice("host-cpu", meter, interval_s=0.5)
    device.start()
    weights = Attribution(prefill_weight, 1.0)
    machine0, cpu0 = busy_jiffies()
    j0 = meter.read().joules
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(variant.backend, tag0 + i, max_tokens, device, weights,
                                         t0) for i in range(c)))
    wall = time.perf_counter() - t0
    machine1, cpu1 = busy_jiffies()
    device.tick()
    meter_j = meter.read().joules - j0
    device.close()
    own = cpu1 - cpu0
    return Run(variant.label, c, wall, sum(r[0] for r in results), sum(r[1] for r in results),
               own, meter_j, sum(r[3] for r in results), [r[2] for r in results],
               other_cores=max(machine1 - machine0 - own, 0.0) / wall)


def git_state() -> tuple[str, bool]:
    """The commit measured, and whether the backends differ from it."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "backends"], capture_output=True, text=True,
                               check=False).stdout.strip()
    except OSError:
        return "?", False
    return commit, bool(dirty)


def med(values: list[float]) -> float:
    return statistics.median(values)


def cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(med(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def report(runs: list[Run], variants: list[Variant], levels: list[int], args: argparse.Namespace,
           header: str) -> str:
    lines = [header, "",
             "| variant | c | agg tok/s | CPU-s / token | est. J / token | attributed / meter "
             "| p50 TTFT s | tok/s vs c=1 | CPU-s/token vs c=1 | other cores |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts: list[str] = []
    for v in variants:
        base = [r for r in runs if r.variant == v.label and r.concurrency == levels[0]]
        base_tok = med([r.tok_s for r in base])
        base_cpu = med([r.cpu_per_token for r in base])
        base_j = med([r.j_per_token for r in base])
        for c in levels:
            rs = [r for r in runs if r.variant == v.label and r.concurrency == c]
            tok, cpu = med([r.tok_s for r in rs]), med([r.cpu_per_token for r in rs])
            ttfts = [t for r in rs for t in r.ttft_s if t >= 0]
            lines.append(
                f"| {v.label} | {c} | {cell([r.tok_s for r in rs], '.1f')} "
                f"| {cell([r.cpu_per_token for r in rs], '.4f')} "
                f"| {cell([r.j_per_token for r in rs], '.3f')} "
                f"| {med([r.attributed_j / r.meter_j for r in rs]):.6f} "
                f"| {med(ttfts) if ttfts else float('nan'):.2f} "
                f"| {tok / base_tok:.2f}x | {cpu / base_cpu:.2f}x "
                f"| {med([r.other_cores for r in rs]):.2f} |")
        top = [r for r in runs if r.variant == v.label and r.concurrency == levels[-1]]
        tok_ratio = med([r.tok_s for r in top]) / base_tok
        cpu_ratio = med([r.cpu_per_token for r in top]) / base_cpu
        j_ratio = med([r.j_per_token for r in top]) / base_j
        verdicts.append(
            f"- **{v.label}**: c={levels[-1]} aggregate tok/s = {tok_ratio:.2f}x c={levels[0]} "
            f"(target >= 2x: {'met' if tok_ratio >= 2 else 'NOT met'}); CPU-s/token = "
            f"{cpu_ratio:.2f}x (target <= 0.6x: {'met' if cpu_ratio <= 0.6 else 'NOT met'}); "
            f"estimated J/token {base_j:.3f} -> {med([r.j_per_token for r in top]):.3f} J "
            f"({j_ratio:.2f}x).")
    lines += ["", "Targets (c=max against c=1, medians):", "", *verdicts, "",
              f"Prompt tokens per request (mean): "
              f"{statistics.mean(r.prompt_tokens / r.concurrency for r in runs):.0f}; output "
              f"tokens per request (mean): "
              f"{statistics.mean(r.tokens / r.concurrency for r in runs):.1f} "
              f"(max_tokens {args.max_tokens}, temperature 0)."]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    levels = sorted({int(x) for x in args.concurrency.split(",")})
    commit, dirty = git_state()  # what is measured: the code as imported now
    variants = [Variant("batched (this tree)", load_module(None), args.slots or levels[-1],
                        args.threads)]
    variants += [parse_variant(text, levels[-1]) for text in args.variant]
    for v in variants:
        settings = v.module.LlamaCppSettings(model=args.model, n_ctx=1024, slots=v.slots,
                                             n_threads=v.threads, queue_timeout_s=600)
        v.backend = v.module.LlamaCppBackend("bench", settings)
        print(f"loading {v.label} (slots {v.slots}, threads {v.threads or 'all'}) ...",
              file=sys.stderr, flush=True)
        await v.backend.start()
        await run_once(v, 1, 4, 0, args.watts_per_core, args.idle_watts, args.prefill_weight)
    runs: list[Run] = []
    tag = 1000
    total = args.repeats * len(levels) * len(variants)
    for rep in range(args.repeats):
        for c in levels:
            for v in variants:
                tag += 10
                run = await run_once(v, c, args.max_tokens, tag, args.watts_per_core,
                                     args.idle_watts, args.prefill_weight)
                runs.append(run)
                print(f"[{len(runs)}/{total}] repeat {rep + 1} {v.label} c={c}: "
                      f"{run.tok_s:.1f} tok/s, {run.cpu_per_token:.4f} CPU-s/token, "
                      f"{run.j_per_token:.3f} J/token, other cores {run.other_cores:.2f}",
                      file=sys.stderr, flush=True)
    for v in variants:
        await v.backend.close()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    import llama_cpp

    header = (
        f"# llama.cpp in-process concurrency ({stamp} UTC)\n\n"
        f"Model `{args.model}`; chat prompt ~125 tokens (unique tag per request: no prefix-cache "
        f"hits), max_tokens {args.max_tokens}, temperature 0, streamed; concurrency "
        f"{', '.join(map(str, levels))}; {args.repeats} repeats, interleaved; cells: median "
        f"[min-max]. Estimated J = process CPU-s x {args.watts_per_core:g} W/core + "
        f"{args.idle_watts:g} W idle (the gateway's `meter: estimated`), attributed per request "
        f"by the gateway's EnergyDevice (prefill_weight {args.prefill_weight:g}); `attributed / "
        f"meter` is the sum of the requests' shares over the meter.\n\n"
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"llama-cpp-python {llama_cpp.__version__}; commit {commit}"
        f"{' + uncommitted backend changes' if dirty else ''}. The CPU is shared with other "
        f"jobs (`other cores`: CPU the rest of the machine used during a run, in cores): "
        f"numbers are noisy.\n\nCommand: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    text = report(runs, variants, levels, args, header)
    print(text)
    out = ROOT / "benchmarks" / "results" / f"llamacpp-concurrency-{stamp}.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=None,
                        help="slots of the default variant (default: the highest concurrency)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the default variant (default: all cores)")
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL:module=PATH,slots=N,threads=N (repeatable)")
    parser.add_argument("--watts-per-core", type=float, default=12.0)
    parser.add_argument("--idle-watts", type=float, default=0.0)
    parser.add_argument("--prefill-weight", type=float, default=0.1)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
