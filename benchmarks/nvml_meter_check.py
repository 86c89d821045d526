#!/usr/bin/env python3
"""The gateway's own NVML meter on a real GPU, in both of its modes, against power that this
script integrates itself.

``gateway/energy/nvml.py``'s :class:`NvmlMeter` reads the GPU's total-energy counter where
the GPU has one and falls back to integrating sampled power otherwise. This runs two of them
at once on GPU 0, one as it starts (the counter) and one forced onto power sampling every
50 ms, plus an independent sampler of ``nvmlDeviceGetPowerUsage`` every 20 ms, over an idle
window and a bf16 matrix-multiply window, and prints each one's joules side by side. It
writes ``nvml-meter-<time>.md`` to ``--out``.

The meter's two modules are loaded on their own (``meter.py`` and ``nvml.py``, not the
``gateway`` package), so that this runs on a GPU machine that has PyTorch and nvidia-ml-py
but not the gateway's dependencies. It only reads: it never changes clocks or power limits.

    python3 benchmarks/nvml_meter_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
import types
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

ENERGY = Path(__file__).resolve().parent.parent / "gateway" / "energy"


def load_meter() -> Any:
    """``NvmlMeter`` from ``gateway/energy/nvml.py``, with only ``meter.py`` beside it."""
    package = types.ModuleType("jg_energy")
    package.__path__ = [str(ENERGY)]
    sys.modules["jg_energy"] = package
    for name in ("meter", "nvml"):
        spec = importlib.util.spec_from_file_location(f"jg_energy.{name}", ENERGY / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"jg_energy.{name}"] = module
        spec.loader.exec_module(module)
    return sys.modules["jg_energy.nvml"].NvmlMeter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--load-s", type=float, default=20.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import pynvml
    import torch

    nvml_meter = load_meter()
    counter = nvml_meter([0])
    counter.start()
    sampled = nvml_meter([0], sample_period_s=0.05)
    sampled.start()
    gpu = sampled._gpus[0]  # forced onto the fallback: power sampled and integrated
    gpu.uses_counter = False
    gpu.sample_power(time.monotonic())
    sampled._sampler = threading.Thread(target=sampled._sample, daemon=True)
    sampled._sampler.start()

    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1000))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def window(label: str, seconds: float, work: Callable[[], object]) -> tuple[Any, ...]:
        c0, s0, t0 = counter.read().joules, sampled.read().joules, time.monotonic()
        while time.monotonic() - t0 < seconds:
            work()
        t1 = time.monotonic()
        c1, s1 = counter.read().joules, sampled.read().joules
        inside = [(t, w) for t, w in samples if t0 <= t <= t1]
        own = sum((w0 + w1) / 2 * (u1 - u0) for (u0, w0), (u1, w1) in pairwise(inside))
        own *= (t1 - t0) / (inside[-1][0] - inside[0][0])
        return label, t1 - t0, c1 - c0, s1 - s0, own

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)

    def load() -> None:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()

    load()  # kernels and clocks warm before the windows
    rows = [window("idle", args.idle_s, lambda: time.sleep(0.1)),
            window("bf16 matmul 8192", args.load_s, load)]
    stop.set()
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    lines = [f"# NvmlMeter on {name}, driver {pynvml.nvmlSystemGetDriverVersion()}", "",
             f"Meters: {counter.describe()}; {sampled.describe()} (forced, every 50 ms). "
             "`own`: nvmlDeviceGetPowerUsage every 20 ms, integrated here.", "",
             "| window | s | counter J | sampling J | own J | mean W | sampling / counter | "
             "own / counter |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, seconds, c, s, own in rows:
        lines.append(f"| {label} | {seconds:.1f} | {c:.1f} | {s:.1f} | {own:.1f} | "
                     f"{c / seconds:.1f} | {s / c:.4f} | {own / c:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"nvml-meter-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
