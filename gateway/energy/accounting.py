"""Which device each backend's energy is read from, and the per-request entry point.

Backends that run on the same hardware share one :class:`EnergyDevice`, so the same
joules are never counted twice: every in-process llama.cpp backend shares the host
(RAPL, or the CPU-time estimate), backends on the same GPUs share one NVML device, and
backends read from the same exporter series share it. An HTTP upstream without an
exporter is priced per token on its own device.

``meter: auto`` picks, for in-process backends: RAPL when readable, else the CPU-time
estimate; for HTTP upstreams: the Prometheus exporter when ``prometheus_url`` is set,
else the token-price estimate. The choice and the reason are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backends import Usage
from policies import Policy
from policies.schema import EnergySpec

from .attribution import EnergyDevice, RequestEnergy
from .estimated import CpuTimeMeter, TokenPriceMeter
from .meter import Meter, MeterUnavailable, Reading
from .nvml import NvmlMeter
from .prometheus import PrometheusMeter
from .rapl import RaplMeter

log = logging.getLogger("joulegate.energy")


def _meter_for(backend: str, kind: str, spec: EnergySpec) -> tuple[str, Callable[[], Meter]]:
    """(device key, meter factory) for one backend. The factory may raise MeterUnavailable."""
    choice = spec.meter
    if choice == "nvml":
        return f"nvml:{','.join(map(str, spec.gpus))}", lambda: NvmlMeter(spec.gpus)
    if choice == "rapl":
        return f"rapl:{spec.rapl_root}", lambda: RaplMeter(spec.rapl_root)
    http = kind in ("openai", "vllm")  # the model runs elsewhere: no local meter applies
    if choice == "prometheus" or (choice == "auto" and http and spec.prometheus_url):
        if not spec.prometheus_url:
            raise MeterUnavailable("meter 'prometheus' needs prometheus_url")
        return (f"prometheus:{spec.prometheus_url}:{spec.prometheus_series}",
                lambda: PrometheusMeter(spec.prometheus_url, spec.prometheus_series,
                                        spec.prometheus_unit, spec.interval_s))
    if http:
        return f"tokens:{backend}", lambda: TokenPriceMeter(spec.joules_per_prompt_token,
                                                            spec.joules_per_output_token)
    if choice == "auto":
        rapl = RaplMeter(spec.rapl_root)
        try:
            rapl.start()
            return f"rapl:{spec.rapl_root}", lambda: rapl  # the probe is the meter
        except MeterUnavailable as exc:
            log.info("energy for '%s': RAPL not usable (%s); estimating from CPU time",
                     backend, exc)
    return "host-cpu", lambda: CpuTimeMeter(spec.watts_per_core, spec.idle_watts)


class EnergyAccounting:
    """All energy devices of the gateway; lives as long as the app."""

    def __init__(self, on_tick: Callable[[EnergyDevice, Reading, float], None] | None = None):
        self.on_tick = on_tick
        self._devices: dict[str, EnergyDevice] = {}
        self._specs: dict[str, EnergySpec] = {}

    def devices_for(self, policy: Policy) -> dict[str, EnergyDevice]:
        """backend name → device, creating devices not seen before. Raises ValueError
        naming the backend when an explicitly chosen meter cannot work."""
        out: dict[str, EnergyDevice] = {}
        for name, spec in policy.backends.items():
            energy = spec.energy
            try:
                key, factory = _meter_for(name, spec.kind, energy)
                device = self._devices.get(key)
                if device is None or self._specs[key] != energy:
                    device = EnergyDevice(
                        key, factory(), interval_s=energy.interval_s,
                        prompt_weight=energy.prefill_weight, spread_idle=energy.spread_idle,
                        on_tick=self.on_tick)
                    if isinstance(device.meter, TokenPriceMeter):  # split exactly by price
                        device.prompt_weight = energy.joules_per_prompt_token
                        device.output_weight = energy.joules_per_output_token
                    device.start()
                    old = self._devices.get(key)
                    self._devices[key], self._specs[key] = device, energy
                    if old is not None:
                        old.close()
                    log.info("energy for '%s': %s [%s]", name, device.meter.describe(),
                             device.source)
            except MeterUnavailable as exc:
                raise ValueError(f"backends.{name}.energy: meter '{energy.meter}' "
                                 f"unavailable: {exc}") from None
            out[name] = device
        return out

    def open(self, device: EnergyDevice, progress: Usage, scale: float) -> RequestEnergy:
        return RequestEnergy(device, device.open(progress, scale), source=device.source)

    @property
    def devices(self) -> list[EnergyDevice]:
        return list(self._devices.values())

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        self._devices.clear()
