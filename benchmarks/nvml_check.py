#!/usr/bin/env python3
"""Check NVML's energy counter against integrated power samples on a real GPU.

Runs a steady matrix-multiply load on one GPU for --seconds (default 60) while a thread
samples nvmlDeviceGetPowerUsage every --period seconds; compares the delta of
nvmlDeviceGetTotalEnergyConsumption over the same window with the trapezoid integral of
the samples. Prints a table and writes it to benchmarks/results/nvml-check-<time>.md.
Reads only; never changes clocks or power limits. Needs nvidia-ml-py and torch (CUDA).
"""

from __future__ import annotations

import argparse
import threading
import time
from itertools import pairwise
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--period", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=8192, help="matmul size (bf16)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
            time.sleep(args.period)

    device = torch.device(f"cuda:{args.gpu}")
    a = torch.randn(args.size, args.size, device=device, dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device=device, dtype=torch.bfloat16)
    for _ in range(10):  # warm up clocks and kernels before the window
        a @ b
    torch.cuda.synchronize()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(args.period * 2)
    e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.monotonic()
    iters = 0
    while time.monotonic() - t0 < args.seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        iters += 20
    e1, t1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.monotonic()
    stop.set()
    sampler.join()
    window = [(t, w) for t, w in samples if t0 <= t <= t1]
    integral = sum((w0 + w1) / 2 * (s1 - s0) for (s0, w0), (s1, w1) in pairwise(window))
    covered = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
    counter_j = (e1 - e0) / 1000.0
    scaled = integral * (t1 - t0) / covered if covered else float("nan")
    tflops = 2 * args.size ** 3 * iters / (t1 - t0) / 1e12
    rows = [
        ("GPU", name), ("window s", f"{t1 - t0:.2f}"), ("matmul TFLOP/s (bf16)", f"{tflops:.0f}"),
        ("power samples", f"{len(window)} (every {args.period * 1000:.0f} ms)"),
        ("mean power W", f"{sum(w for _, w in window) / max(len(window), 1):.1f}"),
        ("NVML energy counter delta J", f"{counter_j:.1f}"),
        ("integrated power J (scaled to window)", f"{scaled:.1f}"),
        ("counter / integrated", f"{counter_j / scaled:.4f}"),
    ]
    table = "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"nvml-check-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(f"# NVML energy check, {time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n")
    print(f"written to {path}")
    pynvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
