"""The gateway's live state: one immutable :class:`Snapshot` of policy + backends at a time.

A request takes the current snapshot once (:meth:`Runtime.acquire`) and uses it to the
end, so a reload never changes the rules under a request in flight. :meth:`Runtime.reload`
builds the next snapshot beside the current one, reusing every backend whose settings did
not change (no model is loaded twice), and swaps it in only when all of it is ready; a bad
file or a backend that fails to start leaves the old snapshot serving. Backends the new
policy dropped are closed once the last request using them has finished.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from backends import Backend, Health
from policies import (
    Policy,
    PolicyError,
    PolicyIssue,
    RoutingSpec,
    TierSpec,
    load_policy,
    resolve_key_ref,
)

from .auth import KeyIndex
from .budgets import open_ledger
from .budgets.guard import BudgetGuard
from .carbon import CarbonSource, PrometheusCarbon
from .energy import (
    BackendEnergy,
    Calibration,
    EnergyAccounting,
    EnergyDevice,
    EnergySettingsError,
    Reading,
)
from .metrics import Metrics
from .routing import CapacityTracker, DifficultyEstimator, create_estimator
from .supervise import Backoff, Supervisor
from .sustainability import DEFAULT_SITE, Factors, Site, backend_sites, build_sites
from .tier_slots import TierSlots
from .usage_log import USAGE_LOG_NAME, UsageLog

if TYPE_CHECKING:
    from policies.schema import BackendSpec

log = logging.getLogger("joulegate")


@dataclass(eq=False)
class Snapshot:
    """Everything one request needs, fixed for the request's lifetime."""

    version: int
    policy: Policy
    backends: dict[str, Backend]
    tenant_keys: KeyIndex
    admin_keys: KeyIndex
    #: tier name → tier, and concrete model name → tier.
    tiers: dict[str, TierSpec]
    models: dict[str, TierSpec]
    #: backend name → the energy device it draws on and its own attribution weights.
    energy: dict[str, BackendEnergy]
    #: tenant → its routing settings in force; estimator name → estimator.
    routing: dict[str, RoutingSpec]
    estimators: dict[str, DifficultyEstimator]
    in_flight: int = 0
    retired: bool = False
    #: backend name → the site it runs at; site name → site (the default site included).
    sites: dict[str, Site] = field(default_factory=dict)
    site_by_name: dict[str, Site] = field(default_factory=lambda: {DEFAULT_SITE: Site(DEFAULT_SITE)})
    #: (tenant, capabilities, model) → the tiers that can serve it: found once per snapshot
    #: (:func:`gateway.steps.route_context`); bounded, as only models that resolved are kept.
    capable: dict[tuple[str, tuple[str, ...], str | None], tuple[TierSpec, ...]] = \
        field(default_factory=dict)

    def backend_for(self, tier: TierSpec) -> Backend:
        return self.backends[tier.backend]

    def output_tokens(self, tier: TierSpec, max_tokens: int) -> int:
        """The most output tokens a generation asking for ``max_tokens`` can produce on
        ``tier``: never more than its backend's context window, which prompt and output
        share. What budgets hold and routing predicts joules for (a client may ask for a
        million tokens of a 4,096-token model)."""
        window = self.backend_for(tier).context_window()
        return max_tokens if window is None else min(max_tokens, window)

    def factors(self, tier: TierSpec) -> Factors:
        """The facility, water and carbon figures of ``tier``'s site now."""
        site = self.sites.get(tier.backend)
        return (site or self.site_by_name[DEFAULT_SITE]).factors()


def index_keys(policy: Policy, source: str) -> tuple[KeyIndex, KeyIndex]:
    """Tenant and admin key indexes; an ``env:`` reference to an unset variable is an error."""
    issues: list[PolicyIssue] = []

    def resolve(path: str) -> Callable[[str], str]:
        def _resolve(ref: str) -> str:
            try:
                return resolve_key_ref(ref)
            except KeyError as exc:
                issues.append(PolicyIssue(path, f"environment variable {exc.args[0]} is unset or "
                                                f"empty, so key reference '{ref}' has no key"))
                return "00" * 32
        return _resolve

    tenants = KeyIndex((resolve(f"tenants.{name}.keys")(ref), name)
                       for name, spec in policy.tenants.items() for ref in spec.keys)
    admin = KeyIndex((resolve("admin.keys")(ref), "admin") for ref in policy.admin.keys)
    if issues:
        raise PolicyError(source, issues)
    return tenants, admin


def state_dir(policy: Policy) -> Path:
    """Where calibration and the embedded ledger live: the policy's ``state_dir``, else
    ``$XDG_STATE_HOME/joulegate`` (``~/.local/state/joulegate``)."""
    if policy.state_dir:
        return Path(policy.state_dir).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "joulegate"


def _share_devices(backends: dict[str, Backend], energy: EnergyAccounting,
                   bindings: dict[str, BackendEnergy]) -> None:
    """A device metered as a whole (a GPU's counter) but serving other clients too (a shared
    vLLM server) charges the gateway only its share of the server's token work. A device
    that several backends share, or whose backend cannot tell, charges all it reads."""
    users: dict[str, list[str]] = {}
    for name, binding in bindings.items():
        users.setdefault(binding.device, []).append(name)
    for names in users.values():
        device = energy.device(bindings[names[0]])
        own = backends[names[0]].own_fraction
        device.own_fraction = own if device.source == "measured" and len(names) == 1 else None


def build_from_kind(name: str, spec: BackendSpec) -> Backend:
    """A backend from its policy entry, as its kind builds one (:mod:`backends.registry`)."""
    return spec.backend_kind.build(name, spec)


def _same_backend(old: BackendSpec | None, new: BackendSpec) -> bool:
    """Whether a backend can be kept across a reload: its energy settings are the energy
    accounting's business (they never restart a backend)."""
    return old is not None and old.model_copy(update={"energy": None, "site": None}) == \
        new.model_copy(update={"energy": None, "site": None})


class Runtime:
    """Owns the current snapshot, the backends' lifecycle, and what outlives a policy
    version: metrics, energy devices and the calibration table."""

    def __init__(self, policy_path: str | Path,
                 build_backend: Callable[[str, BackendSpec], Backend] | None = None):
        self.policy_path = Path(policy_path)
        #: Builds a backend from its policy entry; default: as its kind does
        #: (:func:`build_from_kind`). Tests plug a scripted backend in here.
        self.build_backend = build_backend or build_from_kind
        self.metrics = Metrics()
        self.energy = EnergyAccounting(on_tick=self._on_energy_tick, metrics=self.metrics)
        self.calibration: Calibration = Calibration()
        self.budgets: BudgetGuard | None = None
        self.capacity = CapacityTracker()
        self.tier_slots = TierSlots()
        self._current: Snapshot | None = None
        self._retired: list[Snapshot] = []
        self._reload_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        #: The supervised background loops (health watch, calibration saver), closed with
        #: the runtime. How long a failed loop waits before it restarts:
        self.backoff = Backoff()
        self.background: list[Supervisor] = []
        #: site name → (its ``carbon`` spec, the source built from it): kept across reloads
        #: while the spec is unchanged; Prometheus sources refresh in the background.
        self.carbon_sources: dict[str, tuple[object, CarbonSource]] = {}
        #: One line per finished request, for ``joulegate report`` (made by :meth:`start`).
        self.usage_log: UsageLog | None = None

    @property
    def current(self) -> Snapshot:
        if self._current is None:
            raise RuntimeError("runtime not started")
        return self._current

    # -- request side -----------------------------------------------------------------

    @property
    def guard(self) -> BudgetGuard:
        """The budget guard (made by :meth:`start`)."""
        if self.budgets is None:
            raise RuntimeError("the runtime is not started")
        return self.budgets

    def acquire(self) -> Snapshot:
        """The snapshot a new request uses; pair with :meth:`release`."""
        snap = self.current
        snap.in_flight += 1
        return snap

    def release(self, snap: Snapshot) -> None:
        snap.in_flight -= 1
        if snap.retired and snap.in_flight == 0:
            self._collect()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the policy and start every backend. Raises on any failure."""
        policy = load_policy(self.policy_path)
        state = state_dir(policy)
        self.calibration = Calibration(state / "calibration.json")
        rotation = policy.server.usage_log
        self.usage_log = UsageLog(state / USAGE_LOG_NAME, max_bytes=int(rotation.max_mb * 2**20),
                                  keep=rotation.keep).start()
        self.budgets = self._budget_guard(policy, state)
        self._current = await self._build(policy, version=1)
        self.budgets.watch(policy)
        self.budgets.start()
        self.supervise("health_watch", self._watch_health)
        await self._swap_carbon(self._current)
        self.supervise("carbon_intensity", self._watch_carbon)

    def supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> Supervisor:
        """Run ``loop()`` as a supervised background task (restarted when it fails, counted
        in ``joulegate_background_task_restarts_total``) until :meth:`close`."""
        supervisor = Supervisor(name, loop, self.metrics, self.backoff).start()
        self.background.append(supervisor)
        return supervisor

    def _budget_guard(self, policy: Policy, state: Path) -> BudgetGuard:
        spec = policy.ledger
        return BudgetGuard(open_ledger(spec, state), spec.reservation_ttl_s,
                           spec.on_unavailable == "fail_open", self.metrics, self.calibration)

    def _on_energy_tick(self, device: EnergyDevice, reading: Reading, idle_j: float) -> None:
        for dev, watts in reading.watts.items():
            self.metrics.power.labels(device.name, dev).set(watts)
        if idle_j > 0:
            self.metrics.idle_energy.labels(device.name).inc(idle_j)

    async def reload(self) -> Snapshot:
        """Swap in the policy file's current content, or raise and keep the old one."""
        async with self._reload_lock:
            old = self.current
            new = await self._build(load_policy(self.policy_path), version=old.version + 1,
                                    reuse=old)
            if new.policy.ledger != old.policy.ledger:
                log.warning("ledger settings changed: they take effect at the next restart")
            self._current = new
            await self._swap_carbon(new)
            if self.budgets is not None:
                self.budgets.watch(new.policy)
            old.retired = True
            self._retired.append(old)
            if old.in_flight == 0:
                self._collect()
            log.info("policy reloaded from %s (version %d)", self.policy_path, new.version)
            return new

    @staticmethod
    async def probe(snap: Snapshot) -> dict[str, Health]:
        """Every backend's health now, probed concurrently; a probe that raises is a failure."""
        names = list(snap.backends)
        results = await asyncio.gather(*(snap.backends[n].health() for n in names),
                                       return_exceptions=True)
        return {n: r if isinstance(r, Health) else Health(False, str(r))
                for n, r in zip(names, results, strict=True)}

    async def _watch_health(self) -> None:
        """Probe every backend of the current snapshot every ``server.health_interval_s``
        and export the results as ``joulegate_backend_up``. (``/readyz`` probes afresh.)"""
        reported: set[str] = set()
        while True:
            snap = self.current
            health = await self.probe(snap)
            self.metrics.record_health(health, reported - health.keys())
            reported = set(health)
            await asyncio.sleep(snap.policy.server.health_interval_s)

    async def _swap_carbon(self, snap: Snapshot) -> None:
        """Start the carbon sources ``snap`` brought in; close those it no longer uses."""
        used = {id(s.carbon): s.carbon for s in snap.site_by_name.values() if s.carbon is not None}
        for source in used.values():
            if isinstance(source, PrometheusCarbon):
                source.start(self.metrics)
        dropped = [src for _, src in self.carbon_sources.values() if id(src) not in used]
        self.carbon_sources = {name: (site_spec.carbon, site.carbon)
                               for name, site in snap.site_by_name.items()
                               if site.carbon is not None
                               and (site_spec := snap.policy.sites.get(name)) is not None}
        for source in dropped:
            if isinstance(source, PrometheusCarbon):
                await source.close()
        self._record_carbon(snap)

    def _record_carbon(self, snap: Snapshot) -> None:
        for name, site in snap.site_by_name.items():
            if site.carbon is not None:
                self.metrics.carbon_intensity.labels(name).set(site.intensity()[0])

    async def _watch_carbon(self) -> None:
        """``joulegate_carbon_intensity_g_per_kwh{site}`` every 15 s (sources with a
        schedule change on the hour; Prometheus sources refresh on their own)."""
        while True:
            await asyncio.sleep(15)
            self._record_carbon(self.current)

    async def close(self) -> None:
        background, self.background = self.background, []
        await asyncio.gather(*(s.close() for s in background))
        sources, self.carbon_sources = self.carbon_sources, {}
        await asyncio.gather(*(src.close() for _, src in sources.values()
                               if isinstance(src, PrometheusCarbon)))
        live = {id(b): b for s in [self._current, *self._retired] if s for b in s.backends.values()}
        await asyncio.gather(*(b.close() for b in live.values()), return_exceptions=True)
        self.energy.close()
        self.calibration.save()
        if self.usage_log is not None:
            await asyncio.to_thread(self.usage_log.close)
        if self.budgets is not None:
            await self.budgets.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._current = None
        self._retired.clear()

    async def _build(self, policy: Policy, version: int, reuse: Snapshot | None = None) -> Snapshot:
        tenant_keys, admin_keys = index_keys(policy, str(self.policy_path))
        try:
            plan = self.energy.prepare(policy)
        except EnergySettingsError as exc:
            raise PolicyError(str(self.policy_path), [PolicyIssue(exc.path, exc.message)]) \
                from None
        try:
            routing, estimators = self._routing(policy, reuse)
            backends: dict[str, Backend] = {}
            fresh: list[Backend] = []
            for name, spec in policy.backends.items():
                if reuse is not None and _same_backend(reuse.policy.backends.get(name), spec):
                    backends[name] = reuse.backends[name]
                    continue
                backend = self.build_backend(name, spec)
                backends[name] = backend
                fresh.append(backend)
            results = await asyncio.gather(*(b.start() for b in fresh), return_exceptions=True)
            failures = [(b, r) for b, r in zip(fresh, results, strict=True)
                        if isinstance(r, BaseException)]
            for backend, result in zip(fresh, results, strict=True):
                if not isinstance(result, BaseException):
                    log.info("backend '%s' (%s) started", backend.name, backend.kind)
            if failures:
                await asyncio.gather(*(b.close() for b in fresh), return_exceptions=True)
                raise PolicyError(str(self.policy_path), [
                    PolicyIssue(f"backends.{b.name}", f"failed to start: {r}")
                    for b, r in failures])
        except BaseException:
            self.energy.discard(plan)  # the devices in use stay as they are
            raise
        energy = self.energy.commit(plan)
        _share_devices(backends, self.energy, energy)
        tiers = {t.name: t for t in policy.ordered_tiers()}
        for tier in tiers.values():
            self.calibration.seed(tier.name, tier.joules_per_prompt_token,
                                  tier.joules_per_output_token)
        sites, _ = build_sites(policy, self.carbon_sources)
        return Snapshot(version=version, policy=policy, backends=backends,
                        tenant_keys=tenant_keys, admin_keys=admin_keys, tiers=tiers,
                        models={t.model: t for t in tiers.values()}, energy=energy,
                        routing=routing, estimators=estimators,
                        sites=backend_sites(policy, sites), site_by_name=sites)

    def _routing(self, policy: Policy, reuse: Snapshot | None
                 ) -> tuple[dict[str, RoutingSpec], dict[str, DifficultyEstimator]]:
        """Each tenant's routing settings and the estimators they name (built once each)."""
        routing = {name: policy.tenant_routing(name) for name in policy.tenants}
        estimators: dict[str, DifficultyEstimator] = {}
        issues = []
        for tenant, spec in routing.items():
            own = policy.tenants[tenant].routing
            prior = spec.cascade.prior if spec.cascade is not None else None
            for name, key, overridden in (
                    (spec.estimator or "learned", "estimator",
                     own is not None and own.estimator is not None),
                    (prior, "cascade.prior", own is not None and own.cascade is not None)):
                if name is None or name in estimators:
                    continue
                if reuse is not None and name in reuse.estimators:
                    estimators[name] = reuse.estimators[name]
                    continue
                try:
                    estimators[name] = create_estimator(name)
                except ValueError as exc:
                    where = f"tenants.{tenant}.routing" if overridden else "routing"
                    issues.append(PolicyIssue(f"{where}.{key}", str(exc)))
        if issues:
            raise PolicyError(str(self.policy_path), issues)
        inert = [t for t, spec in routing.items() if spec.cascade is not None
                 and spec.cascade.prior is not None and spec.cascade.prior_weight == 0]
        if inert:
            log.warning("routing.cascade.prior has no effect at prior_weight 0 (the default) "
                        "for tenant%s %s: set prior_weight (2 to 3 suits HumanEval- and "
                        "MMLU-like traffic) or drop prior", "s" if len(inert) > 1 else "",
                        ", ".join(f"'{t}'" for t in inert))
        return routing, estimators

    def _collect(self) -> None:
        """Close backends that only drained, retired snapshots still referenced."""
        busy = [s for s in self._retired if s.in_flight > 0]
        keep = {id(b) for s in [self.current, *busy] for b in s.backends.values()}
        drained = [s for s in self._retired if s.in_flight == 0]
        self._retired = busy
        doomed = {id(b): b for s in drained for b in s.backends.values() if id(b) not in keep}
        for backend in doomed.values():
            task = asyncio.get_running_loop().create_task(backend.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("backend '%s' closed after reload", backend.name)
