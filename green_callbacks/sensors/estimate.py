"""CPU energy estimated from TDP x utilisation, for machines with nothing to read."""

from __future__ import annotations

from green_callbacks.sensors.base import Method, Reading, Sensor
from green_callbacks.sensors.integrator import PowerIntegrator

# CodeCarbon's convention for a CPU whose model is unknown; override with ``cpu_tdp_w``.
DEFAULT_CPU_TDP_W = 85.0


class CpuEstimateSensor(Sensor):
    """Machine CPU power modelled as ``tdp_w`` x utilisation, integrated over time.

    Utilisation comes from ``psutil.cpu_times`` deltas taken in the sampler thread (never
    ``cpu_percent(interval=...)``, which sleeps, and not the module-global ``cpu_percent(None)``
    state that other tools share). Always recorded as ``estimated``: it is a model, its error
    can be tens of percent, and it says nothing about DRAM.

    Args:
        tdp_w: the CPU's thermal design power in watts (all sockets together).
    """

    component = "cpu"

    def __init__(self, tdp_w: float | None = None) -> None:
        super().__init__()
        import psutil

        self._psutil = psutil
        self.tdp_w = DEFAULT_CPU_TDP_W if tdp_w is None else float(tdp_w)
        if self.tdp_w <= 0:
            raise ValueError(f"cpu_tdp_w={tdp_w!r} must be a positive number of watts")
        self._integrator = PowerIntegrator(interval_mean=True)
        self._last: tuple[float, float] | None = None
        self._power_w = 0.0

    @property
    def devices(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> dict[str, str]:
        return {"cpu": f"estimate: {self.tdp_w:g} W TDP x utilisation of {self._psutil.cpu_count()} CPUs"}

    def _busy_total(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        return total - idle, total

    def start(self, now_s: float) -> None:
        self._last = self._busy_total()
        self._integrator.add(now_s, 0.0)

    def sample(self, now_s: float) -> dict[str, float]:
        busy, total = self._busy_total()
        if self._last is not None and total > self._last[1]:
            util = (busy - self._last[0]) / (total - self._last[1])
            self._power_w = self.tdp_w * min(max(util, 0.0), 1.0)
            self._integrator.add(now_s, self._power_w)
        self._last = (busy, total)
        return {"cpu": self._power_w}

    def read(self, now_s: float) -> Reading:
        return Reading({"cpu": self._integrator.joules_at(now_s)}, {"cpu": Method.ESTIMATED},
                       {"cpu": self._power_w})
