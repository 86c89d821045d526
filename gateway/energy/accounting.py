"""Which device each backend's energy is read from, and the per-request entry point.

A *device* is a piece of hardware and the meter that reads it: every in-process llama.cpp
backend shares the host (RAPL, or the CPU-time estimate), backends on the same GPUs share
one NVML device, and backends read from the same exporter series share it. An HTTP upstream
without an exporter is priced per token on its own device. A device is keyed by what it
measures and lives as long as the app; a reload replaces it only when its *meter settings*
change (:class:`DeviceSpec`), and then hands the requests in flight to the new one.

How a request's work is weighed (``prefill_weight``, ``spread_idle``, a token price) is
the backend's own :class:`Attribution`, not the device's, so backends with different
weights share one device and a reload that changes weights touches no device.

``meter: auto`` picks, for in-process backends (a kind whose capabilities say ``local``):
RAPL when readable, else the CPU-time estimate; for HTTP upstreams: the Prometheus exporter
when ``prometheus_url`` is set, else the token-price estimate. The choice and the reason
are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backends import Usage
from policies import EnergySpec, Policy

from .attribution import Attribution, EnergyDevice, RequestEnergy
from .estimated import CpuTimeMeter, TokenPriceMeter
from .meter import Meter, MeterUnavailable, Reading
from .nvml import NvmlMeter
from .prometheus import PrometheusMeter
from .rapl import RaplMeter

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("joulegate.energy")


class EnergySettingsError(ValueError):
    """A backend's energy settings cannot work: ``path`` is where in the policy."""

    def __init__(self, backend: str, message: str):
        self.path, self.message = f"backends.{backend}.energy", message
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class DeviceSpec:
    """What a device needs: the hardware it measures (``key``) and its meter's reading
    settings. Two specs with the same key and settings are the same device."""

    key: str
    #: (EnergySpec field, value) of every setting that changes how the meter reads.
    settings: tuple[tuple[str, object], ...]
    factory: Callable[[], Meter] = field(compare=False)
    #: Token-priced: the backend's prices are its attribution weights.
    priced: bool = False


def _settings(spec: EnergySpec, *names: str) -> tuple[tuple[str, object], ...]:
    return tuple((name, getattr(spec, name)) for name in (*names, "interval_s"))


def _nvml(backend: str, local: bool, spec: EnergySpec) -> DeviceSpec:
    return DeviceSpec(f"nvml:{','.join(map(str, spec.gpus))}", _settings(spec),
                      lambda: NvmlMeter(spec.gpus))


def _rapl(backend: str, local: bool, spec: EnergySpec) -> DeviceSpec:
    return DeviceSpec(f"rapl:{spec.rapl_root}", _settings(spec), lambda: RaplMeter(spec.rapl_root))


def _prometheus(backend: str, local: bool, spec: EnergySpec) -> DeviceSpec:
    url = spec.prometheus_url
    if not url:
        raise MeterUnavailable("meter 'prometheus' needs prometheus_url")
    return DeviceSpec(f"prometheus:{url}:{spec.prometheus_series}",
                      _settings(spec, "prometheus_unit"),
                      lambda: PrometheusMeter(url, spec.prometheus_series,
                                              spec.prometheus_unit, spec.interval_s))


def _estimated(backend: str, local: bool, spec: EnergySpec) -> DeviceSpec:
    if not local:  # the model runs elsewhere: priced by the tokens it processed
        return DeviceSpec(f"tokens:{backend}", _settings(spec), TokenPriceMeter, priced=True)
    return DeviceSpec("host-cpu", _settings(spec, "watts_per_core", "idle_watts"),
                      lambda: CpuTimeMeter(spec.watts_per_core, spec.idle_watts))


def _auto(backend: str, local: bool, spec: EnergySpec) -> DeviceSpec:
    if not local:  # no host meter applies: the exporter when there is one, else prices
        return (_prometheus if spec.prometheus_url else _estimated)(backend, local, spec)
    rapl = RaplMeter(spec.rapl_root)
    try:
        rapl.start()
        return DeviceSpec(f"rapl:{spec.rapl_root}", _settings(spec),
                          lambda: rapl)  # the probe is the meter
    except MeterUnavailable as exc:
        log.info("energy for '%s': RAPL not usable (%s); estimating from CPU time", backend, exc)
    return _estimated(backend, local, spec)


#: ``meter:`` choice → the device it reads a backend's energy from. ``local``: the backend's
#: kind runs the model in this process (its capabilities), so a host meter applies. A
#: factory may raise MeterUnavailable.
METERS: dict[str, Callable[[str, bool, EnergySpec], DeviceSpec]] = {
    "auto": _auto, "nvml": _nvml, "rapl": _rapl, "prometheus": _prometheus,
    "estimated": _estimated,
}


def _attribution(spec: EnergySpec, device: DeviceSpec) -> Attribution:
    if device.priced:  # split exactly by price
        return Attribution(spec.joules_per_prompt_token, spec.joules_per_output_token,
                           spec.spread_idle)
    return Attribution(spec.prefill_weight, 1.0, spec.spread_idle)


@dataclass(frozen=True)
class BackendEnergy:
    """What a snapshot holds for one backend: the device it draws on and its own weights."""

    backend: str
    device: str
    attribution: Attribution


@dataclass
class EnergyPlan:
    """A policy's energy, prepared beside the devices in use: :meth:`EnergyAccounting.commit`
    puts it in force, :meth:`EnergyAccounting.discard` drops it."""

    backends: dict[str, BackendEnergy]
    #: device key → (the new device, its spec), for hardware new or with changed settings.
    new: dict[str, tuple[EnergyDevice, DeviceSpec]] = field(default_factory=dict)


class EnergyAccounting:
    """All energy devices of the gateway, one per piece of hardware; lives as long as the app."""

    def __init__(self, on_tick: Callable[[EnergyDevice, Reading, float], None] | None = None,
                 metrics: Metrics | None = None):
        self.on_tick = on_tick
        #: Where the devices' supervised timers and pollers count their restarts.
        self.metrics = metrics
        self._devices: dict[str, EnergyDevice] = {}
        self._specs: dict[str, DeviceSpec] = {}

    def prepare(self, policy: Policy) -> EnergyPlan:
        """Each backend's device and weights, starting a device only for hardware not seen
        before or whose meter settings changed. Raises EnergySettingsError when an
        explicitly chosen meter cannot work, or when backends on one piece of hardware ask
        for different meter settings."""
        plan = EnergyPlan({})
        chosen: dict[str, tuple[str, DeviceSpec]] = {}  # key → (first backend, its spec)
        try:
            for name, spec in policy.backends.items():
                energy = spec.energy
                try:
                    device = METERS[energy.meter](name, spec.backend_kind.capabilities.local,
                                                     energy)
                except MeterUnavailable as exc:
                    raise EnergySettingsError(name, f"meter '{energy.meter}' unavailable: "
                                              f"{exc}") from None
                first = chosen.setdefault(device.key, (name, device))
                if first[1] != device:
                    theirs = dict(first[1].settings)
                    diff = ", ".join(f"{k} {v!r} here, {theirs.get(k)!r} there"
                                     for k, v in device.settings if theirs.get(k) != v)
                    raise EnergySettingsError(
                        name, f"measures the same hardware ({device.key}) as backend "
                        f"'{first[0]}' but with other meter settings ({diff}); one piece of "
                        "hardware has one meter: set them alike")
                if device.key not in plan.new and self._specs.get(device.key) != device:
                    try:
                        new = EnergyDevice(device.key, device.factory(),
                                           interval_s=energy.interval_s, on_tick=self.on_tick,
                                           metrics=self.metrics)
                        new.meter.start()  # fails here if it cannot work; charges from commit
                    except MeterUnavailable as exc:
                        raise EnergySettingsError(name, f"meter '{energy.meter}' unavailable: "
                                                  f"{exc}") from None
                    plan.new[device.key] = (new, device)
                plan.backends[name] = BackendEnergy(name, device.key,
                                                    _attribution(energy, device))
        except BaseException:
            self.discard(plan)
            raise
        return plan

    def commit(self, plan: EnergyPlan) -> dict[str, BackendEnergy]:
        """Put a prepared plan in force: a device whose settings changed hands its requests
        in flight to its successor and closes. Returns backend name → its energy."""
        for key, (device, spec) in plan.new.items():
            old = self._devices.get(key)
            self._devices[key], self._specs[key] = device, spec
            if old is not None:
                old.hand_over(device)
            else:
                device.activate()
            users = [b for b in plan.backends.values() if b.device == key]
            log.info("energy for %s: %s [%s]%s", ", ".join(f"'{b.backend}'" for b in users),
                     device.meter.describe(), device.source,
                     " (meter settings changed: replaced)" if old is not None else "")
        plan.new = {}
        return plan.backends

    def discard(self, plan: EnergyPlan) -> None:
        """Drop a plan that will not be used: close the devices it started."""
        for device, _ in plan.new.values():
            device.close()
        plan.new = {}

    def devices_for(self, policy: Policy) -> dict[str, BackendEnergy]:
        """:meth:`prepare` and :meth:`commit` in one step."""
        return self.commit(self.prepare(policy))

    def device(self, backend: BackendEnergy) -> EnergyDevice:
        """The device charging ``backend``'s requests now."""
        return self._devices[backend.device]

    def open(self, backend: BackendEnergy, progress: Usage, scale: float) -> RequestEnergy:
        """Start charging one request of ``backend`` on the device in force now (a request
        that took an older snapshot still lands on a live device)."""
        device = self.device(backend)
        return RequestEnergy(device.open(progress, scale, backend.attribution),
                             source=device.source)

    @property
    def devices(self) -> list[EnergyDevice]:
        return list(self._devices.values())

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        self._devices.clear()
        self._specs.clear()
