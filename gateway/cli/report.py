"""`joulegate report`: energy, water and carbon per tenant and tier, and what routing and
deferral saved, from the usage log (``<state_dir>/usage.jsonl``, :mod:`gateway.usage_log`).

The baseline is what the same requests would have cost sent to the *full* tier (the
costliest tier the tenant may use) at once: its joules are the full tier's calibration
(``calibration.json`` of the state folder, else the policy's seeds) for the request's
tokens, and its grams are those joules at the full tier's site at the time the request
could have run (``sub`` for deferred work, else when it ran). Embeddings count as their
own baseline (a chat tier does not embed). So, per row:

- routing saved = baseline - the served tier's cost at the same (immediate) time;
- deferral saved = the served tier's cost at the immediate time - what it cost when it ran.

A site's intensity at another time comes from its schedule or constant; for a Prometheus
site (no history), from the logged intensity of that site's requests in the same hour,
else the request's own.

Writes ``report-<stamp>.csv`` and ``report-<stamp>.png`` (matplotlib, from the ``bench``
extra; without it the PNG is skipped with a note) to ``--out`` (default
``<state_dir>/reports``).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import add_policy_option, policy_state

if TYPE_CHECKING:
    from policies import Policy

    from ..energy import Calibration
    from ..sustainability import Site

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """``7d``, ``12h``, ``30m``, ``2w`` back from ``now``, or an ISO date/time (UTC)."""
    m = _SINCE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since takes a span like 7d, 12h, 30m or an ISO time, not {text!r}") \
            from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@dataclass
class Row:
    """One tenant × tier (``*`` for the totals)."""

    tenant: str
    tier: str
    requests: int = 0
    it_joules: float = 0.0
    facility_joules: float = 0.0
    water_l: float = 0.0
    co2_g: float = 0.0
    #: Everything on the full tier, at once.
    baseline_joules: float = 0.0
    baseline_co2_g: float = 0.0
    #: The served tiers, at once (before deferral).
    immediate_co2_g: float = 0.0

    @property
    def routing_saved_joules(self) -> float:
        return self.baseline_joules - self.it_joules

    @property
    def routing_saved_co2_g(self) -> float:
        return self.baseline_co2_g - self.immediate_co2_g

    @property
    def deferral_saved_co2_g(self) -> float:
        return self.immediate_co2_g - self.co2_g

    def add(self, other: Row) -> None:
        for f in fields(self):
            if f.name not in ("tenant", "tier"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


CSV_COLUMNS = ("tenant", "tier", "requests", "it_joules", "facility_joules", "water_l", "co2_g",
               "baseline_joules", "baseline_co2_g", "routing_saved_joules",
               "routing_saved_co2_g", "deferral_saved_co2_g")


@dataclass
class Report:
    since: float
    until: float
    rows: list[Row] = field(default_factory=list)
    total: Row = field(default_factory=lambda: Row("*", "*"))
    #: Notes on what the figures rest on (unknown tiers, missing intensities).
    notes: list[str] = field(default_factory=list)


class _Intensity:
    """gCO₂/kWh of a site at a time: its schedule or constant, else logged values."""

    def __init__(self, sites: dict[str, Site], records: Iterable[dict[str, Any]]):
        self.sites = sites
        seen: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in records:
            if isinstance(r.get("g"), (int, float)) and r.get("cs") == "prometheus":
                seen[(str(r.get("site")), int(r.get("t", 0)) // 3600)].append(float(r["g"]))
        self.logged = {k: sum(v) / len(v) for k, v in seen.items()}

    def at(self, site: str, t: float, own: float | None) -> float:
        s = self.sites.get(site)
        if s is not None and s.carbon is not None and s.carbon.source != "prometheus":
            return s.intensity(datetime.fromtimestamp(t, UTC))[0]
        if s is not None and s.carbon is None:
            return 0.0
        logged = self.logged.get((site, int(t) // 3600))
        return logged if logged is not None else (own or 0.0)


def build_report(records: list[dict[str, Any]], policy: Policy, calibration: Calibration,
                 since: float, until: float) -> Report:
    """The report over ``records`` (usage-log lines) with ``since <= t < until``."""
    from ..sustainability import J_PER_KWH, backend_sites, build_sites

    sites, _ = build_sites(policy)
    by_backend = backend_sites(policy, sites)
    tiers = {t.name: t for t in policy.tiers}
    intensity = _Intensity(sites, records)
    rows: dict[tuple[str, str], Row] = {}
    report = Report(since, until)
    unknown: set[str] = set()
    for r in records:
        t = float(r.get("t", 0))
        if not since <= t < until:
            continue
        tenant, tier = str(r.get("tenant")), str(r.get("tier"))
        row = rows.setdefault((tenant, tier), Row(tenant, tier))
        j, co2 = float(r.get("j", 0.0)), float(r.get("co2", 0.0))
        row.requests += 1
        row.it_joules += j
        row.facility_joules += float(r.get("fj", j))
        row.water_l += float(r.get("w", 0.0)) / 1000.0
        row.co2_g += co2
        # What the served tier would have cost at once (the same, unless deferred).
        site_name = str(r.get("site"))
        site = sites.get(site_name)
        pue = site.pue if site is not None else (float(r["fj"]) / j if j and r.get("fj") else 1.0)
        t_now = float(r.get("sub", t))
        immediate = co2 if "sub" not in r else \
            j * pue * intensity.at(site_name, t_now, r.get("g")) / J_PER_KWH
        row.immediate_co2_g += immediate
        # Everything on the full tier, at once.
        full = None
        if tenant in policy.tenants and r.get("ep") != "embeddings":
            full = policy.tenant_tiers(tenant)[-1]
        if full is None or tier not in tiers:
            if tier not in tiers and tier != "other":
                unknown.add(tier)
            row.baseline_joules += j
            row.baseline_co2_g += immediate
            continue
        full_j = j if full.name == tier else \
            calibration.predict(full.name, int(r.get("pt", 0)), int(r.get("ct", 0)))
        full_site = by_backend.get(full.backend) or sites["default"]
        row.baseline_joules += full_j
        row.baseline_co2_g += full_j * full_site.pue * intensity.at(
            full_site.name, t_now, r.get("g") if full_site.name == site_name else None) / J_PER_KWH
    report.rows = sorted(rows.values(), key=lambda x: (x.tenant, x.tier))
    for row in report.rows:
        report.total.add(row)
    if unknown:
        report.notes.append(f"tiers not in the policy (counted as their own baseline): "
                            f"{', '.join(sorted(unknown))}")
    return report


def csv_rows(report: Report) -> list[list[str]]:
    out = [list(CSV_COLUMNS)]
    for row in [*report.rows, report.total]:
        out.append([row.tenant, row.tier, str(row.requests)] + [
            f"{getattr(row, c):.6f}" for c in CSV_COLUMNS[3:]])
    return out


def write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(report))


def write_png(report: Report, path: Path) -> bool:
    """Bars of IT/facility energy, water and CO₂ per tenant/tier, with the baseline's CO₂;
    False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.tenant}/{r.tier}" for r in report.rows] or ["(no requests)"]
    rows = report.rows or [Row("", "")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], [r.it_joules / 1000 for r in rows], 0.4, label="IT")
    axes[0].bar([i + 0.2 for i in x], [r.facility_joules / 1000 for r in rows], 0.4,
                label="facility")
    axes[0].set_title("energy (kJ)")
    axes[0].legend()
    axes[1].bar(list(x), [r.water_l for r in rows], 0.6, color="tab:cyan")
    axes[1].set_title("water (L)")
    axes[2].bar([i - 0.2 for i in x], [r.co2_g for r in rows], 0.4, label="served")
    axes[2].bar([i + 0.2 for i in x], [r.baseline_co2_g for r in rows], 0.4,
                label="full tier, at once", color="tab:gray")
    axes[2].set_title("CO2 (g)")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    start = datetime.fromtimestamp(report.since, UTC).strftime("%Y-%m-%d %H:%M")
    end = datetime.fromtimestamp(report.until, UTC).strftime("%Y-%m-%d %H:%M")
    fig.suptitle(f"joulegate usage {start} - {end} UTC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def print_report(report: Report) -> None:
    start = datetime.fromtimestamp(report.since, UTC).isoformat(timespec="seconds")
    end = datetime.fromtimestamp(report.until, UTC).isoformat(timespec="seconds")
    print(f"usage from {start} to {end}")
    print(f"{'tenant':14s} {'tier':12s} {'requests':>8s} {'IT kJ':>10s} {'facility kJ':>12s} "
          f"{'water L':>9s} {'CO2 g':>10s} {'saved J':>10s} {'saved CO2 g':>12s}")
    for r in [*report.rows, report.total]:
        saved = r.routing_saved_co2_g + r.deferral_saved_co2_g
        print(f"{r.tenant:14s} {r.tier:12s} {r.requests:8d} {r.it_joules / 1000:10.3f} "
              f"{r.facility_joules / 1000:12.3f} {r.water_l:9.4f} {r.co2_g:10.3f} "
              f"{r.routing_saved_joules:10.1f} {saved:12.3f}")
    t = report.total
    print(f"against sending everything to the full tier at once ({t.baseline_joules:.1f} J, "
          f"{t.baseline_co2_g:.3f} gCO2): routing saved {t.routing_saved_joules:.1f} J and "
          f"{t.routing_saved_co2_g:.3f} g, deferral saved {t.deferral_saved_co2_g:.3f} g")
    for note in report.notes:
        print(f"note: {note}")


def cmd_report(args: argparse.Namespace) -> int:
    from ..energy import Calibration
    from ..usage_log import USAGE_LOG_NAME, read_usage

    policy, state = policy_state(args.policy)
    now = time.time()
    try:
        since = parse_since(args.since, now)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    log_path = Path(args.log) if args.log else state / USAGE_LOG_NAME
    print(f"reading {log_path} ...", file=sys.stderr)
    records = read_usage(log_path, since)
    calibration = Calibration(state / "calibration.json")
    for tier in policy.tiers:
        calibration.seed(tier.name, tier.joules_per_prompt_token, tier.joules_per_output_token)
    report = build_report(records, policy, calibration, since, now)
    if args.tenant:
        report.rows = [r for r in report.rows if r.tenant == args.tenant]
        report.total = Row("*", "*")
        for row in report.rows:
            report.total.add(row)
    print_report(report)
    out = Path(args.out) if args.out else state / "reports"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    csv_path, png_path = out / f"report-{stamp}.csv", out / f"report-{stamp}.png"
    write_csv(report, csv_path)
    print(f"wrote {csv_path}")
    if write_png(report, png_path):
        print(f"wrote {png_path}")
    else:
        print("no PNG: matplotlib is not installed (pip install 'joulegate[bench]')")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="energy, water and carbon per tenant and tier, and what "
                                      "routing and deferral saved (CSV + PNG)")
    add_policy_option(p)
    p.add_argument("--since", default="7d", help="a span back from now (7d, 12h, 30m, 2w) or "
                                                 "an ISO time (default: 7d)")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--out", metavar="DIR", help="where the CSV and PNG go "
                                                "(default: <state_dir>/reports)")
    p.add_argument("--log", metavar="FILE", help="the usage log (default: "
                                                 "<state_dir>/usage.jsonl)")
    p.set_defaults(func=cmd_report)
