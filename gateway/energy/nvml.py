"""NVIDIA GPUs through NVML (``pynvml`` / ``nvidia-ml-py``).

Per GPU, the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the
driver loaded; Volta and newer) when the GPU supports it; otherwise power
(``nvmlDeviceGetPowerUsage``, mW) sampled by a background thread and integrated with the
trapezoid rule. A backend may span several GPUs (tensor parallel): their energy is summed.
A counter that goes backwards (driver reload) is treated as restarted from zero.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .meter import Meter, MeterUnavailable, Reading


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise MeterUnavailable(f"NVML cannot start: {exc}") from None
    return pynvml


class _Gpu:
    def __init__(self, nvml: Any, index: int):
        self.nvml = nvml
        self.index = index
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.total_j = 0.0
        self.counter_mj: int | None = None
        try:
            self.counter_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.uses_counter = True
        except nvml.NVMLError:
            self.uses_counter = False
        self.last_power_w: float | None = None
        self.last_sample_t: float | None = None

    def watts(self) -> float:
        milliwatts: int = self.nvml.nvmlDeviceGetPowerUsage(self.handle)
        return milliwatts / 1000.0

    def read_counter(self) -> None:
        now = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        assert self.counter_mj is not None
        delta = now - self.counter_mj if now >= self.counter_mj else now  # reset: restarted at 0
        self.counter_mj = now
        self.total_j += delta / 1000.0

    def sample_power(self, t: float) -> None:
        watts = self.watts()
        if self.last_power_w is not None and self.last_sample_t is not None:
            self.total_j += (watts + self.last_power_w) / 2 * (t - self.last_sample_t)
        self.last_power_w, self.last_sample_t = watts, t


class NvmlMeter(Meter):
    kind = "nvml"

    def __init__(self, gpus: list[int], sample_period_s: float = 0.1):
        self.gpu_indices = gpus
        self.sample_period_s = sample_period_s
        self._gpus: list[_Gpu] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        nvml = _load_pynvml()
        try:
            self._gpus = [_Gpu(nvml, i) for i in self.gpu_indices]
        except nvml.NVMLError as exc:
            raise MeterUnavailable(f"NVML cannot open GPUs {self.gpu_indices}: {exc}") from None
        if any(not g.uses_counter for g in self._gpus):
            now = time.monotonic()
            for gpu in self._gpus:
                if not gpu.uses_counter:
                    gpu.sample_power(now)
            self._sampler = threading.Thread(target=self._sample, name="nvml-power", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_period_s):
            now = time.monotonic()
            with self._lock:
                for gpu in self._gpus:
                    if not gpu.uses_counter:
                        gpu.sample_power(now)

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()

    def read(self) -> Reading:
        with self._lock:
            for gpu in self._gpus:
                if gpu.uses_counter:
                    gpu.read_counter()
            watts = {f"gpu{g.index}": g.watts() for g in self._gpus}
            return Reading(sum(g.total_j for g in self._gpus), watts)

    def describe(self) -> str:
        modes = ", ".join(f"gpu{g.index}: {'energy counter' if g.uses_counter else 'power sampling'}"
                          for g in self._gpus)
        return f"nvml ({modes})"
