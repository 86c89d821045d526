"""CPU package and DRAM energy through Linux powercap (Intel RAPL; AMD exposes the same).

Reads ``energy_uj`` of every top-level ``intel-rapl:N`` package zone and every ``dram``
subzone, and folds wrap-arounds at ``max_energy_range_uj`` into a monotone total. Only
meaningful on bare metal, where the gateway's llama.cpp is what loads the CPU.
"""

from __future__ import annotations

from pathlib import Path

from .meter import Meter, MeterUnavailable, Reading


class _Zone:
    def __init__(self, path: Path):
        self.path = path
        self.name = (path / "name").read_text().strip()
        self.max_uj = int((path / "max_energy_range_uj").read_text())
        self.last_uj = self._raw()
        self.total_j = 0.0

    def _raw(self) -> int:
        return int((self.path / "energy_uj").read_text())

    def update(self) -> None:
        now = self._raw()
        delta = now - self.last_uj
        if delta < 0:  # the counter wrapped around
            delta += self.max_uj + 1
        self.last_uj = now
        self.total_j += delta / 1e6


class RaplMeter(Meter):
    kind = "rapl"

    def __init__(self, root: str = "/sys/class/powercap"):
        self.root = Path(root)
        self._zones: list[_Zone] = []

    def start(self) -> None:
        packages = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        dram = [p for pkg in packages for p in sorted(pkg.glob("intel-rapl:*:*"))
                if (p / "name").is_file() and (p / "name").read_text().strip() == "dram"]
        if not packages:
            raise MeterUnavailable(f"no RAPL zones under {self.root}")
        try:
            self._zones = [_Zone(p) for p in packages + dram]
        except PermissionError:
            raise MeterUnavailable(f"RAPL counters under {self.root} are not readable "
                                   "(energy_uj is root-only on most kernels)") from None
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"RAPL counters unreadable: {exc}") from None

    def read(self) -> Reading:
        for zone in self._zones:
            zone.update()
        return Reading(sum(z.total_j for z in self._zones))

    def describe(self) -> str:
        return "rapl (" + ", ".join(f"{z.path.name} {z.name}" for z in self._zones) + ")"
