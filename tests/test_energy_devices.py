"""Energy devices belong to hardware, attribution settings to backends.

Two tiers on two llama.cpp backends share the host CPU, each with its own ``prefill_weight``.
The host's meter is scripted (the hardware boundary: a counter the test advances); policies,
accounting, devices and the split are the real code. Requests on both tiers run concurrently
while the policy is reloaded: unchanged, with only attribution settings changed, and with a
changed meter setting. Every joule the hardware spent is charged exactly once, no device is
closed under a request, and a reload rebuilds a device only when its meter settings change.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import yaml

from backends import Usage
from gateway.energy import EnergyAccounting, Meter, Reading
from gateway.energy import accounting as accounting_module
from gateway.runtime import Runtime
from policies import PolicyError, parse_policy

pytestmark = pytest.mark.unit


class Host:
    """The hardware: a cumulative energy counter that only the test advances."""

    def __init__(self) -> None:
        self.joules = 0.0
        self.meters: list[HostMeter] = []


class HostMeter(Meter):
    """Stands in for the CPU meter: reads the host's counter since it started. Reading a
    closed meter fails, as a released hardware handle would."""

    source = "estimated"
    kind = "estimated"
    host: Host

    def __init__(self, watts_per_core: float, idle_watts: float = 0.0):
        self.watts_per_core = watts_per_core
        self.closed = False
        self.base = self.host.joules
        self.host.meters.append(self)

    def read(self) -> Reading:
        if self.closed:
            raise RuntimeError("read from a closed meter")
        return Reading(self.host.joules - self.base)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def host(monkeypatch) -> Host:
    hw = Host()
    meter = type("BoundHostMeter", (HostMeter,), {"host": hw})
    monkeypatch.setattr(accounting_module, "CpuTimeMeter", meter)
    return hw


def policy(weights: dict[str, float], watts_per_core: float = 12.0, interval_s: float = 0.01):
    """Two llama.cpp backends on this host (``small``: q05, ``big``: q15), one tier each."""
    def backend(name: str) -> dict:
        return {"kind": "llamacpp", "model": f"/models/{name}.gguf",
                "energy": {"meter": "estimated", "prefill_weight": weights[name],
                           "watts_per_core": watts_per_core, "interval_s": interval_s}}

    return parse_policy({
        "version": 1,
        "backends": {"q05": backend("q05"), "q15": backend("q15")},
        "tiers": [{"name": "small", "backend": "q05", "model": "q05", "cost": 1.0},
                  {"name": "big", "backend": "q15", "model": "q15", "cost": 1.0}],
        "tenants": {"acme": {"keys": ["sha256:" + "ab" * 32], "default_tier": "small"}},
    })


def test_each_backend_weighs_its_own_requests_on_one_shared_device(host):
    acc = EnergyAccounting()
    bindings = acc.devices_for(policy({"q05": 0.1, "q15": 1.0}))
    assert len(acc.devices) == 1  # one host, one device
    small, big = Usage(), Usage()
    on_small = acc.open(bindings["q05"], small, scale=1.0)
    on_big = acc.open(bindings["q15"], big, scale=1.0)
    small.prompt_tokens = big.prompt_tokens = 100  # work: 100 x 0.1 = 10 and 100 x 1.0 = 100
    host.joules += 11.0
    assert on_small.finish() == pytest.approx(1.0)
    assert on_big.finish() == pytest.approx(10.0)
    acc.close()


def test_reloads_keep_devices_and_every_joule_is_charged_once(host):
    idle: list[float] = []
    acc = EnergyAccounting(on_tick=lambda device, reading, idle_j: idle.append(idle_j))
    rng = random.Random(14)
    charged: list[float] = []
    first = policy({"q05": 0.1, "q15": 1.0})
    state: dict = {}

    async def request(backend: str, scale: float) -> None:
        progress = Usage()
        energy = acc.open(state["bindings"][backend], progress, scale=scale)
        for _ in range(rng.randint(3, 30)):
            progress.prompt_tokens += rng.choice([0, 0, rng.randint(1, 64)])
            progress.completion_tokens += rng.randint(0, 3)
            host.joules += rng.uniform(0.0, 2.0)
            await asyncio.sleep(rng.choice([0, 0, 0.002, 0.01]))
        charged.append(energy.finish())

    async def traffic(backend: str, scale: float, count: int) -> None:
        running: set[asyncio.Task] = set()
        for _ in range(count):
            running.add(asyncio.create_task(request(backend, scale)))
            await asyncio.sleep(rng.uniform(0, 0.01))
        await asyncio.gather(*running)

    async def reloads() -> None:
        await asyncio.sleep(0.05)
        device = acc.devices[0]
        state["bindings"] = acc.devices_for(first)  # unchanged
        assert acc.devices == [device] and len(host.meters) == 1
        await asyncio.sleep(0.05)
        state["bindings"] = acc.devices_for(policy({"q05": 0.3, "q15": 2.0}))  # weights only
        assert acc.devices == [device] and len(host.meters) == 1
        await asyncio.sleep(0.05)
        in_flight = device.active
        assert in_flight > 0
        state["bindings"] = acc.devices_for(policy({"q05": 0.3, "q15": 2.0}, watts_per_core=20))
        assert len(acc.devices) == 1 and acc.devices[0] is not device  # a meter setting changed
        assert acc.devices[0].active == in_flight and device.active == 0  # handed over
        assert len(host.meters) == 2 and host.meters[0].closed and not host.meters[1].closed
        await asyncio.sleep(0.05)
        state["bindings"] = acc.devices_for(policy({"q05": 0.3, "q15": 2.0}, watts_per_core=20))
        assert len(host.meters) == 2

    async def scenario() -> None:
        state["bindings"] = acc.devices_for(first)  # inside the loop: devices tick on timers
        assert len(host.meters) == 1 and len(acc.devices) == 1
        await asyncio.gather(traffic("q05", 1.0, 40), traffic("q15", 2.5, 40), reloads())
        host.joules += 3.0  # idle at the end
        acc.devices[0].tick()

    asyncio.run(scenario())
    assert len(charged) == 80 and all(j >= 0 for j in charged)
    assert sum(charged) + sum(idle) == pytest.approx(host.joules, rel=1e-9)
    assert sum(idle) >= 3.0
    acc.close()
    assert all(m.closed for m in host.meters)


def test_hardware_shared_with_other_meter_settings_is_a_policy_error(host):
    acc = EnergyAccounting()
    spec = policy({"q05": 0.1, "q15": 1.0}).model_dump()
    spec["backends"]["q15"]["energy"]["watts_per_core"] = 30.0
    with pytest.raises(ValueError, match=r"backends\.q15\.energy: measures the same hardware "
                                         r"\(host-cpu\) as backend 'q05'.*watts_per_core"):
        acc.devices_for(parse_policy(spec))
    assert acc.devices == [] and all(m.closed for m in host.meters)


# -- the same through the runtime: a policy file, real backends, a sysfs RAPL tree ---------

def _rapl(root, joules: float) -> None:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text(f"{10**15}\n")
    (zone / "energy_uj").write_text(f"{int(joules * 1e6)}\n")


def _write(path, root, state, weights: dict[str, float], interval_s: float = 0.5,
           extra: dict | None = None) -> None:
    backends = {name: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                       "energy": {"meter": "rapl", "rapl_root": str(root),
                                  "prefill_weight": w, "interval_s": interval_s}}
                for name, w in weights.items()}
    backends.update(extra or {})
    path.write_text(yaml.safe_dump({
        "version": 1, "state_dir": str(state), "backends": backends,
        "tiers": [{"name": n, "backend": n, "model": n, "cost": 1.0} for n in weights],
        "tenants": {"acme": {"keys": ["sha256:" + "ab" * 32], "default_tier": "a"}},
    }))


def test_runtime_reloads_touch_devices_only_when_meter_settings_change(tmp_path):
    root, state, path = tmp_path / "powercap", tmp_path / "state", tmp_path / "policy.yaml"
    _rapl(root, 0.0)
    _write(path, root, state, {"a": 0.1, "b": 1.0})

    async def scenario() -> None:
        rt = Runtime(path)
        await rt.start()
        try:
            snap = rt.acquire()
            backends, device = dict(snap.backends), rt.energy.device(snap.energy["a"])
            assert rt.energy.device(snap.energy["b"]) is device and rt.energy.devices == [device]
            usage = Usage()
            energy = rt.energy.open(snap.energy["a"], usage, scale=1.0)

            _write(path, root, state, {"a": 0.3, "b": 2.0})  # weights only
            new = await rt.reload()
            assert all(new.backends[n] is backends[n] for n in backends)  # not restarted
            assert rt.energy.devices == [device] and not device.closed
            assert new.energy["a"].attribution.prompt_weight == 0.3

            _rapl(root, 1.0)
            usage.completion_tokens = 2
            _write(path, root, state, {"a": 0.3, "b": 2.0}, interval_s=0.25)  # a meter setting
            new = await rt.reload()
            assert all(new.backends[n] is backends[n] for n in backends)
            (replacement,) = rt.energy.devices
            assert replacement is not device and device.closed and replacement.interval_s == 0.25
            assert energy.device is replacement  # the request in flight moved, not stranded

            _write(path, root, state, {"a": 0.3, "b": 2.0}, interval_s=0.25, extra={
                "c": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                      "energy": {"meter": "rapl", "rapl_root": str(tmp_path / "none")}}})
            with pytest.raises(PolicyError, match=r"backends\.c\.energy"):
                await rt.reload()
            assert rt.energy.devices == [replacement] and not replacement.closed

            _rapl(root, 3.0)
            usage.completion_tokens = 5
            assert energy.finish() == pytest.approx(3.0)  # 1 J on the old device, 2 on the new
            rt.release(snap)
        finally:
            await rt.close()

    asyncio.run(scenario())
