"""CPU package and DRAM energy from Linux powercap (RAPL) counters, with wraparound."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from green_callbacks.sensors.base import Method, Reading, Sensor
from green_callbacks.units import brief

POWERCAP_ROOT = Path("/sys/class/powercap")
RAPL_FIX = (
    "RAPL energy counters are readable by root only (the default since CVE-2020-8694). To let "
    "this user read them: sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*/*/energy_uj (lost on reboot; a udev rule or "
    "systemd-tmpfiles entry makes it permanent)."
)


class RaplPermissionError(PermissionError):
    """The powercap tree exists but ``energy_uj`` is root-only."""


@dataclass
class _Zone:
    label: str
    energy_path: Path
    max_range_uj: int
    last_uj: int = 0
    joules: float = 0.0
    method: Method = Method.COUNTER
    power_w: float = 0.0
    last_t_s: float | None = None


def find_zones(root: Path = POWERCAP_ROOT) -> dict[str, list[tuple[str, Path]]]:
    """RAPL zones by component: ``cpu`` (package-N) and ``dram`` (a package's dram subzone).

    ``psys`` (whole platform) is skipped: it contains the others and would count them twice.
    """
    found: dict[str, list[tuple[str, Path]]] = {"cpu": [], "dram": []}
    # /sys/class/powercap lists every zone flat; the device tree nests subzones in packages
    zones = {z.name: z for z in [*root.glob("intel-rapl:*/intel-rapl:*"), *root.glob("intel-rapl:*")]}
    for zone in (zones[name] for name in sorted(zones)):
        parts = zone.name.split(":")
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            continue
        if len(parts) == 2 and name.startswith("package"):
            found["cpu"].append((name, zone))
        elif name == "dram":
            found["dram"].append((f"dram-{parts[1]}", zone))
    return found


class RaplSensor(Sensor):
    """One component (``cpu`` or ``dram``) from the powercap energy counters (µJ).

    Counters wrap at ``max_energy_range_uj``; the sampler reads them every tick, far more often
    than the minutes a wrap takes, so a delta that goes negative is one wrap, unless that wrap would be more energy
    than ``most_w`` for the time since the last read: then the counter was reset (one warning), and its new value is
    what was spent since. A zone whose file vanishes becomes ``unavailable`` with one warning.

    Raises:
        RaplPermissionError: ``energy_uj`` exists but cannot be read (see ``RAPL_FIX``).
        FileNotFoundError: no zone of this component under ``root``.
    """

    most_w = 2000.0  # more than any CPU socket or its DRAM draws: a counter step beyond it is no wrap

    def __init__(self, component: str = "cpu", root: Path | str = POWERCAP_ROOT) -> None:
        super().__init__()
        if component not in ("cpu", "dram"):
            raise ValueError(f"component={component!r} is not valid; choose 'cpu' or 'dram'")
        if not isinstance(root, str | os.PathLike) or not os.fspath(root):
            raise ValueError(f"root={brief(root)} must be the powercap folder's path (default {POWERCAP_ROOT})")
        self.component = component
        self._lock = threading.Lock()
        zones = find_zones(Path(root))[component]
        if not zones:
            raise FileNotFoundError(f"no RAPL {component} zone under {root}")
        self._zones = []
        for label, path in zones:
            energy = path / "energy_uj"
            try:
                energy.read_text()
            except PermissionError as exc:
                raise RaplPermissionError(f"{energy} is not readable. {RAPL_FIX}") from exc
            self._zones.append(_Zone(label, energy, int((path / "max_energy_range_uj").read_text())))

    @property
    def devices(self) -> list[str]:
        return [z.label for z in self._zones]

    def describe(self) -> dict[str, str]:
        out = {z.label: str(z.energy_path.parent) for z in self._zones}
        if self.component == "cpu":
            out["attribution"] = "whole package measured by RAPL: every process on the socket"
        return out

    def start(self, now_s: float) -> None:
        for zone in self._zones:
            try:
                zone.last_uj = int(zone.energy_path.read_text())
                zone.last_t_s = now_s
            except (OSError, ValueError) as exc:
                self._lose(zone, exc)

    def _lose(self, zone: _Zone, exc: Exception) -> None:
        zone.method = Method.UNAVAILABLE
        fix = f" {RAPL_FIX}" if isinstance(exc, PermissionError) else ""  # (made root-only mid-run: the same fix)
        self.warn_once(f"lost-{zone.label}", f"RAPL {zone.label}: {exc}; its energy is 'unavailable' "
                       f"from now on, the joules measured before are kept.{fix}")

    def _poll(self, zone: _Zone, now_s: float) -> None:
        if zone.method is Method.UNAVAILABLE:
            return
        try:
            uj = int(zone.energy_path.read_text())
        except (OSError, ValueError) as exc:
            self._lose(zone, exc)
            return
        delta = uj - zone.last_uj
        if delta < 0:
            delta += zone.max_range_uj
            elapsed_s = now_s - zone.last_t_s if zone.last_t_s is not None else 0.0
            if delta / 1e6 > self.most_w * max(elapsed_s, 1.0):  # more than any socket spends meanwhile: a reset
                self.warn_once(f"reset-{zone.label}",
                               f"RAPL {zone.label}: the counter went back from {zone.last_uj} to {uj} µJ, not by a "
                               "wrap (that would be more energy than any socket spends meanwhile): taken as a reset, "
                               "and counting goes on from its new value.")
                delta = uj if uj / 1e6 <= self.most_w * max(elapsed_s, 1.0) else 0
        zone.joules += delta / 1e6
        if zone.last_t_s is not None and now_s > zone.last_t_s:
            zone.power_w = delta / 1e6 / (now_s - zone.last_t_s)
        zone.last_uj, zone.last_t_s = uj, now_s

    def sample(self, now_s: float) -> dict[str, float]:
        with self._lock:
            for zone in self._zones:
                self._poll(zone, now_s)
            return {z.label: z.power_w for z in self._zones}

    def read(self, now_s: float) -> Reading:
        with self._lock:
            for zone in self._zones:
                self._poll(zone, now_s)
            return Reading({z.label: z.joules for z in self._zones},
                           {z.label: z.method for z in self._zones},
                           {z.label: z.power_w for z in self._zones})
