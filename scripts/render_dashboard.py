#!/usr/bin/env python3
"""Render the Grafana dashboard's panels to one PNG from a Prometheus (matplotlib).

Every panel's queries run against Prometheus's HTTP API over the last ``--minutes``, with the
dashboard's variables substituted as Grafana would (all tenants, all tiers); each panel
becomes one small chart with its title and unit. A picture for the README, not a Grafana
replacement.

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "helm" / "joulegate" / "dashboards" / "joulegate.json"
UNITS = {"watt": "W", "joule": "J", "s": "s", "percentunit": "share", "reqps": "req/s",
         "massg": "g", "litre": "L", "none": ""}


def substitute(expr: str, variables: dict[str, str]) -> str:
    """The expression with ``$name`` / ``${name}`` variables replaced, longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's panels with queries (rows left out, nested panels included)."""
    found = []
    for panel in dashboard["panels"]:
        found += [p for p in [panel, *panel.get("panels", [])] if p.get("targets")]
    return found


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus: {body}")
    return body["data"]


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    return _get(f"{prometheus}/api/v1/query_range?{query}")["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ",".join(f"{k}={v}" for k, v in labels.items())


def render(prometheus: str, out: Path, minutes: float, variables: dict[str, str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    shown = panels(dashboard)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    cols = 3
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 2.9), squeeze=False)
    drawn = 0
    # strict=False: the grid's last row may have spare axes.
    for ax, panel in zip(axes.flat, shown, strict=False):
        unit = UNITS.get(panel["fieldConfig"]["defaults"].get("unit", "none"), "")
        ax.set_title(panel["title"] + (f" ({unit})" if unit else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        for target in panel["targets"]:
            for series in query_range(prometheus, substitute(target["expr"], variables),
                                      start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"]
                          if math.isfinite(float(v))]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot([x / 60 for x in xs], ys, linewidth=1.2,
                            label=legend(target.get("legendFormat", ""), series["metric"]))
                    drawn += 1
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
        ax.set_xlabel("minutes", fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(dashboard["title"] + " (rendered from Prometheus)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    args = parser.parse_args()
    variables = {"tenant": ".*", "tier": ".*", "__rate_interval": args.rate_interval,
                 "__interval": args.rate_interval, "__range": f"{int(args.minutes)}m"}
    drawn = render(args.prometheus.rstrip("/"), args.out, args.minutes, variables)
    print(f"{args.out}: {drawn} series")


if __name__ == "__main__":
    main()
