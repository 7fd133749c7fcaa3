"""CPU energy estimated from CPU time x watts per busy CPU, for machines with nothing to read."""

from __future__ import annotations

import numbers
import os
import threading

from green_callbacks.sensors.base import Method, Reading, Sensor
from green_callbacks.sensors.cpu_power import (
    DEFAULT_CORE_W,
    CorePower,
    ProcessTree,
    core_power,
    cpu_model,
    machine_busy_seconds,
    usable_cpus,
)
from green_callbacks.sensors.integrator import PowerIntegrator
from green_callbacks.units import brief, is_finite_number

CPU_SCOPES = ("process", "machine")
# a window edge lists the training's processes again where the last listing is older than this: a walk of the tree's
# /proc children files (one small read per thread of the tree) at most 4 times a second, whatever the edges' rate
EDGE_RESCAN_S = 0.25


class CpuEstimateSensor(Sensor):
    """CPU power modelled as watts per busy CPU x the CPUs kept busy, integrated over time.

    ``scope="process"`` (the default) counts the CPU time of this process and its descendants
    (DataLoader workers, ranks launched as children), so a neighbour's load is not charged to the
    training; under ``torchrun`` the launcher that started the ranks is taken as the root.
    ``scope="machine"`` counts every process on the machine (the view of a whole server you own).
    Both read ``psutil`` counters (in the sampler thread, and at window edges); neither sleeps.

    Watts per busy CPU: ``tdp_w`` over the cores this machine shows, else the TDP of a known CPU
    model over its cores (vendor figures, see ``cpu_power.KNOWN_CPUS``), else 12 W (the Green
    Algorithms calculator's figure for an unknown CPU). A process is never charged for more CPUs
    than its affinity and cgroup quota allow, so a 2-vCPU VM costs at most two CPUs' worth, not
    the host package's TDP. Always recorded as ``estimated``: it is a model, its error can be tens
    of percent, and it says nothing about DRAM.

    Args:
        tdp_w: the TDP in watts of all the CPU cores this machine shows (a VM: its share).
        scope: ``"process"`` or ``"machine"`` (see above).
        pid: the root process for ``scope="process"`` (default: this one, or torchrun's agent).
    """

    component = "cpu"

    def __init__(self, tdp_w: float | None = None, scope: str = "process", pid: int | None = None) -> None:
        super().__init__()
        import psutil

        if tdp_w is not None and not (is_finite_number(tdp_w) and 1.0 <= tdp_w <= 10_000.0):
            raise ValueError(f"cpu_tdp_w={brief(tdp_w)} must be a finite number in [1, 10000] watts or None")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, numbers.Integral) or pid < 1):
            raise ValueError(f"pid={brief(pid)} must be a process id (a whole number >= 1) or None (this process)")
        pid = None if pid is None else int(pid)  # (numpy's integers: psutil takes only int)
        if scope not in CPU_SCOPES:
            raise ValueError(f"cpu_scope={scope!r} is not valid; choose from {list(CPU_SCOPES)}")
        self._psutil = psutil
        self.scope = scope
        self.visible_cpus = psutil.cpu_count() or 1
        physical = psutil.cpu_count(logical=False) or self.visible_cpus
        self.core: CorePower = core_power(tdp_w, cpu_model(), physical, self.visible_cpus)
        if scope == "process":
            self.max_cpus, self._cpus_how = usable_cpus()
            if pid is None and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: the ranks are the agent's children
                pid = os.getppid()
            self._tree: ProcessTree | None = ProcessTree(psutil, pid)
        else:
            self.max_cpus, self._cpus_how = float(self.visible_cpus), f"{self.visible_cpus} CPUs visible"
            self._tree = None
        self._integrator = PowerIntegrator(interval_mean=True)
        self._lock = threading.Lock()  # the sampler thread and a window edge both update the counters
        self._t0_s = self._last_s = 0.0
        self._last_busy = self._last_total = self._charged_s = 0.0
        self._power_w = 0.0

    @property
    def tdp_w(self) -> float:
        """The most this estimate can charge (watts): every usable CPU busy."""
        return self.core.watts * self.max_cpus

    @property
    def devices(self) -> list[str]:
        return ["cpu"]

    def add_peers(self, pids: list[int]) -> None:
        """The node's other ranks, when they are not this process's descendants (Ray workers, ddp_spawn)."""
        if self._tree is not None and pids:
            self._tree.add_peers(pids)

    def attribution(self) -> str:
        """What is counted and how, in one line (the run's ``green.cpu_attribution`` tag)."""
        if self._tree is None:
            what = "whole machine: busy CPU time of every process"
        else:
            what = (f"process tree of pid {self._tree.root.pid} (up to {self._tree.processes} processes): "
                    "CPU time of the training and its children")
        return (f"{what} x {self.core.watts:.3g} W per busy CPU ({self.core.source}), "
                f"capped at {self.max_cpus:g} CPUs ({self._cpus_how})")

    def describe(self) -> dict[str, str]:
        return {"cpu": f"estimate: {self.core.watts:.3g} W per busy CPU, at most {self.tdp_w:.3g} W",
                "attribution": self.attribution()}

    def _busy_cpu_s(self, now_s: float, rescan_s: float | None) -> float:
        """CPU seconds to charge since the last update: the tree's, or the machine's busy share."""
        if self._tree is not None:
            busy = self._tree.cpu_seconds(now_s, rescan_s)
            # a burst (children reaped at once) is charged whole, within the run's CPU x wall bound
            room = self.max_cpus * (now_s - self._t0_s) - self._charged_s
            delta = min(max(busy - self._last_busy, 0.0), max(room, 0.0))
        else:
            busy, total = machine_busy_seconds(self._psutil)
            share = (busy - self._last_busy) / (total - self._last_total) if total > self._last_total else 0.0
            delta = min(max(share, 0.0), 1.0) * self.visible_cpus * (now_s - self._last_s)
            self._last_total = total
        self._last_busy = busy
        return delta

    def start(self, now_s: float) -> None:
        with self._lock:
            self._t0_s = self._last_s = now_s
            if self._tree is not None:
                self._last_busy = self._tree.cpu_seconds(now_s)
            else:
                self._last_busy, self._last_total = machine_busy_seconds(self._psutil)
            self._integrator.add(now_s, 0.0)

    def _update(self, now_s: float, rescan_s: float | None) -> None:
        with self._lock:
            if now_s <= self._last_s:
                return
            delta = self._busy_cpu_s(now_s, rescan_s)
            self._charged_s += delta
            self._power_w = self.core.watts * delta / (now_s - self._last_s)
            self._integrator.add(now_s, self._power_w)
            self._last_s = now_s

    def sample(self, now_s: float) -> dict[str, float]:
        self._update(now_s, rescan_s=None)
        return {"cpu": self._power_w}

    def read(self, now_s: float) -> Reading:
        """Brings the known processes' counters up to ``now_s`` (microseconds each), so a window edge includes
        workers reaped just before it; and lists the tree's processes again where the last listing is older than
        ``EDGE_RESCAN_S``, so that workers started since (a DataLoader's, at an epoch's start) are charged to the
        window they ran in: found by the sampler's listing once a second, a worker's CPU so far went to whichever
        window was open then (the next epoch's, for an epoch shorter than a second)."""
        self._update(now_s, rescan_s=EDGE_RESCAN_S)
        return Reading({"cpu": self._integrator.joules_at(now_s)}, {"cpu": Method.ESTIMATED},
                       {"cpu": self._power_w})

    def peek(self, now_s: float) -> Reading:
        """Up to the sampler's last update, not extrapolated: an estimate's power can be a burst (children
        reaped at once are charged whole), and holding it to ``now_s`` put budget checks above what the
        next point books for the same stretch."""
        return Reading({"cpu": self._integrator.integrated_j}, {"cpu": Method.ESTIMATED},
                       {"cpu": self._power_w})


__all__ = ["CPU_SCOPES", "DEFAULT_CORE_W", "CpuEstimateSensor"]
