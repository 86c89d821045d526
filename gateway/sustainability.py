"""Beyond joules at the chip: facility energy, water and carbon of a request.

A *site* (policy ``sites:``; backends name theirs with ``site:``) is where a backend's
hardware runs. It has

- ``pue``: Power Usage Effectiveness, facility energy ÷ IT energy (The Green Grid). A
  request's *facility joules* are its IT joules (``energy_joules``, what the meters see)
  × PUE: cooling, power conversion and lighting included.
- ``wue_l_per_kwh``: Water Usage Effectiveness, litres of site water per kWh of **IT**
  energy (The Green Grid's definition: annual site water ÷ IT equipment energy). A
  request's water is its IT kWh × WUE.
- a carbon-intensity source (:mod:`gateway.carbon`), gCO₂ per kWh of grid electricity. The
  grid supplies the whole facility, so a request's CO₂ is its facility kWh × intensity.

Each figure carries its source, like energy does: the site's name, and the carbon source
(``constant``, ``schedule``, ``prometheus``; ``unavailable`` while a Prometheus source has
not answered and has no fallback, ``none`` when the site has no carbon source, both giving
0 g). A backend without a site is on the default site: PUE 1, WUE 0, no carbon source.

:class:`Factors` are a site's figures at one moment, per IT joule: a request takes them when
it starts on a tier, so its usage, headers, metrics and budget charge agree. A site whose
carbon source is constant (or absent) has its factors computed once, at policy load.

Budgets may be kept in joules, facility kWh, litres or gCO₂ (:data:`UNITS`). The ledger
holds every unit as *joule-equivalents* (the unit's value × 3.6 MJ/kWh, :data:`LEDGER_SCALE`)
so that its rounding to 1e-9 is as exact for kWh and grams as it is for joules; a request's
IT joules × :meth:`Factors.per_joule` is its charge in a window's ledger amount.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .carbon import (
    CarbonSource,
    CarbonUnavailable,
    ConstantCarbon,
    PrometheusCarbon,
    ScheduleCarbon,
)

if TYPE_CHECKING:
    from policies.schema import CarbonSpec, Policy, SiteSpec

    from .budgets.ledger import WindowState

#: Joules in one kWh.
J_PER_KWH = 3.6e6
#: Budget units: IT joules, facility kWh, litres of water, grams of CO₂.
UNITS = ("joules", "facility_kwh", "litres", "gco2")
#: A window's ledger amount = its value in its unit × this (joule-equivalents).
LEDGER_SCALE = {"joules": 1.0, "facility_kwh": J_PER_KWH, "litres": J_PER_KWH, "gco2": J_PER_KWH}
#: How amounts of each unit are written.
UNIT_SYMBOL = {"joules": "J", "facility_kwh": "facility kWh", "litres": "L", "gco2": "gCO2"}
DEFAULT_SITE = "default"


def to_unit(amount: float, unit: str) -> float:
    """A ledger amount (joule-equivalents) in ``unit``."""
    return amount / LEDGER_SCALE[unit]


def from_unit(value: float, unit: str) -> float:
    """A value in ``unit`` as a ledger amount."""
    return value * LEDGER_SCALE[unit]


def format_amount(amount: float, unit: str) -> str:
    """A ledger amount as text in its unit: ``12.5 J``, ``0.0031 facility kWh``."""
    value = to_unit(amount, unit)
    text = f"{value:.1f}" if unit == "joules" else f"{value:.4g}"
    return f"{text} {UNIT_SYMBOL[unit]}"


def in_unit(window: WindowState) -> dict[str, object]:
    """A budget window's figures in its own unit (``*_joules`` are ledger amounts)."""
    u = window.unit
    return {"unit": u, "limit": to_unit(window.limit, u), "granted": to_unit(window.granted, u),
            "spent": to_unit(window.spent, u), "reserved": to_unit(window.reserved, u),
            "remaining": to_unit(window.remaining, u)}


@dataclass(frozen=True, slots=True)
class Footprint:
    """A request's energy, water and carbon, with their sources."""

    site: str
    joules: float
    facility_joules: float
    water_ml: float
    co2_g: float
    g_per_kwh: float
    co2_source: str

    def usage_fields(self) -> dict[str, object]:
        """What ``usage`` carries beside ``energy_joules`` / ``energy_source``."""
        return {"facility_joules": round(self.facility_joules, 6),
                "water_ml": round(self.water_ml, 6), "co2_g": round(self.co2_g, 6),
                "site": self.site, "co2_source": self.co2_source}

    def headers(self) -> dict[str, str]:
        return {"x-joulegate-facility-joules": f"{self.facility_joules:.6f}",
                "x-joulegate-water-ml": f"{self.water_ml:.6f}",
                "x-joulegate-co2-g": f"{self.co2_g:.6f}",
                "x-joulegate-site": self.site,
                "x-joulegate-co2-source": self.co2_source}


@dataclass(frozen=True, slots=True)
class Factors:
    """A site's figures at one moment."""

    site: str
    pue: float = 1.0
    wue_l_per_kwh: float = 0.0
    g_per_kwh: float = 0.0
    co2_source: str = "none"

    @property
    def co2_g_per_joule(self) -> float:
        """Grams of CO₂ per IT joule: PUE × intensity / 3.6 MJ."""
        return self.pue * self.g_per_kwh / J_PER_KWH

    def per_joule(self, unit: str) -> float:
        """Ledger amount (joule-equivalents of ``unit``) per IT joule."""
        if unit == "joules":
            return 1.0
        if unit == "facility_kwh":
            return self.pue
        if unit == "litres":
            return self.wue_l_per_kwh
        if unit == "gco2":
            return self.pue * self.g_per_kwh
        raise ValueError(f"unknown budget unit {unit!r}; expected one of {', '.join(UNITS)}")

    def footprint(self, joules: float) -> Footprint:
        kwh = joules / J_PER_KWH
        return Footprint(self.site, joules, joules * self.pue, kwh * self.wue_l_per_kwh * 1000.0,
                         kwh * self.pue * self.g_per_kwh, self.g_per_kwh, self.co2_source)


#: A schedule's value holds for at least this long: every zone's offset from UTC is a
#: multiple of 15 minutes, so its hours start on a quarter hour of UTC.
_QUARTER_S = 900


class Site:
    """One site: PUE, WUE and where its carbon intensity comes from."""

    __slots__ = ("_key", "_last", "carbon", "fixed", "name", "pue", "wue_l_per_kwh")

    def __init__(self, name: str, pue: float = 1.0, wue_l_per_kwh: float = 0.0,
                 carbon: CarbonSource | None = None):
        self.name, self.pue, self.wue_l_per_kwh, self.carbon = name, pue, wue_l_per_kwh, carbon
        #: The factors when they do not change with time (constant or no carbon source).
        self.fixed: Factors | None = None
        if carbon is None:
            self.fixed = Factors(name, pue, wue_l_per_kwh, 0.0, "none")
        elif isinstance(carbon, ConstantCarbon):
            self.fixed = Factors(name, pue, wue_l_per_kwh, carbon.g_per_kwh, carbon.source)
        #: The factors of "now" last computed, and what they hold for: a schedule's quarter
        #: hour, a Prometheus source's cached value (so a request rarely computes them).
        self._key: object = None
        self._last: Factors | None = None

    def intensity(self, at: datetime | None = None) -> tuple[float, str]:
        """gCO₂/kWh now (or at ``at``) and its source label."""
        if self.carbon is None:
            return 0.0, "none"
        try:
            return self.carbon.intensity(at or datetime.now(UTC)), self.carbon.source
        except CarbonUnavailable:
            return 0.0, "unavailable"

    def factors(self, at: datetime | None = None) -> Factors:
        """The site's figures now (or at ``at``)."""
        if self.fixed is not None:
            return self.fixed
        if at is None:
            key: object
            if isinstance(self.carbon, ScheduleCarbon):
                now = time.time()
                key = int(now // _QUARTER_S)
            elif isinstance(self.carbon, PrometheusCarbon):
                key, now = ("p", self.carbon.value), 0.0
            else:
                key, now = None, time.time()
            if key is not None and key == self._key and self._last is not None:
                return self._last
            g, source = self.intensity(datetime.fromtimestamp(now or time.time(), UTC))
            factors = Factors(self.name, self.pue, self.wue_l_per_kwh, g, source)
            if key is not None:
                self._key, self._last = key, factors
            return factors
        g, source = self.intensity(at)
        return Factors(self.name, self.pue, self.wue_l_per_kwh, g, source)

    def __repr__(self) -> str:
        return f"Site({self.name!r}, pue={self.pue}, wue={self.wue_l_per_kwh}, {self.carbon!r})"


def carbon_source(spec: CarbonSpec) -> CarbonSource:
    """The carbon source a policy's ``carbon:`` entry describes."""
    if spec.constant is not None:
        return ConstantCarbon(spec.constant)
    if spec.schedule is not None:
        return ScheduleCarbon(spec.schedule, spec.tz)
    assert spec.prometheus is not None  # the schema requires exactly one
    p = spec.prometheus
    return PrometheusCarbon(p.url, p.query, p.refresh_s, p.fallback,
                            forecast_query=p.forecast_query)


def build_site(name: str, spec: SiteSpec, carbon: CarbonSource | None) -> Site:
    return Site(name, spec.pue, spec.wue_l_per_kwh, carbon)


def build_sites(policy: Policy, reuse: dict[str, tuple[object, CarbonSource]] | None = None
                ) -> tuple[dict[str, Site], dict[str, tuple[object, CarbonSource]]]:
    """Every site of ``policy`` by name (the default site included), and each site's carbon
    source keyed by site name with the spec it was built from. A source whose spec did not
    change is taken from ``reuse`` (a Prometheus source keeps its cache and task)."""
    sites = {DEFAULT_SITE: Site(DEFAULT_SITE)}
    sources: dict[str, tuple[object, CarbonSource]] = {}
    for name, spec in policy.sites.items():
        carbon = None
        if spec.carbon is not None:
            old = (reuse or {}).get(name)
            if old is not None and old[0] == spec.carbon:
                carbon = old[1]
            else:
                carbon = carbon_source(spec.carbon)
            sources[name] = (spec.carbon, carbon)
        sites[name] = build_site(name, spec, carbon)
    return sites, sources


def backend_sites(policy: Policy, sites: dict[str, Site]) -> dict[str, Site]:
    """Backend name → its site (the default site where it names none)."""
    return {name: sites[getattr(spec, "site", None) or DEFAULT_SITE]
            for name, spec in policy.backends.items()}
