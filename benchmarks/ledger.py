#!/usr/bin/env python3
"""Budget ledger speed: reserve + settle pairs per second and latency percentiles, for the
embedded SQLite ledger and a real Redis (started here on a free loopback port).

    .venv/bin/python benchmarks/ledger.py [--ops 5000] [--concurrency 1 32]

Prints a table and writes it to benchmarks/results/ledger-<time>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.budgets import EmbeddedLedger, Limit  # noqa: E402
from gateway.budgets.redis_ledger import RedisLedger  # noqa: E402

LIMITS = [Limit("1h", 1e12), Limit("1d", 1e12)]


async def run(ledger, ops: int, concurrency: int) -> dict:
    latencies: list[float] = []
    counter = iter(range(ops))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            r = await ledger.reserve("bench", f"r{concurrency}-{i}", 5.0, LIMITS, 600)
            assert r.ok
            await ledger.settle("bench", f"r{concurrency}-{i}", 4.0)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"pairs_per_s": ops / wall, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3}


async def once(ledger, ops: int, concurrency: int) -> dict:
    try:
        return await run(ledger, ops, concurrency)
    finally:
        await ledger.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, make in (("embedded (SQLite)", lambda: EmbeddedLedger(Path(tmp) / "l.sqlite")),
                               ("redis (Lua, loopback)", lambda: RedisLedger(f"redis://127.0.0.1:{port}/0"))):
                for conc in args.concurrency:
                    rows.append((name, conc, asyncio.run(once(make(), args.ops, conc))))
    finally:
        redis.terminate()
    table = ("| ledger | concurrency | reserve+settle pairs/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n"
             + "\n".join(f"| {n} | {c} | {r['pairs_per_s']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |"
                         for n, c, r in rows))
    report = (f"# Budget ledger, {time.strftime('%Y-%m-%d %H:%M')}\n\n{args.ops} reserve+settle pairs "
              f"per row (two windows each), one Python process, {__import__('os').cpu_count()} "
              f"cores.\n\n{table}\n")
    out = ROOT / "benchmarks" / "results" / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
