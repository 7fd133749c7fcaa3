"""What one busy CPU costs, which CPUs a process may use, and the CPU time of a process tree."""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The Green Algorithms calculator's per-core figure for a CPU it does not know ("Any": 12 W per core;
# Lannelongue et al. 2021, data/TDP_cpu.csv of green-algorithms-tool).
DEFAULT_CORE_W = 12.0
DEFAULT_CORE_SOURCE = "Green Algorithms' per-core default for an unknown CPU"

# TDP (W) and physical cores per package from the vendor's product page, for CPUs common in cloud
# VMs and workstations. Matched as whole words in /proc/cpuinfo's "model name".
KNOWN_CPUS: dict[str, tuple[float, int]] = {
    "EPYC 9654": (360.0, 96),
    "EPYC 7763": (280.0, 64),
    "EPYC 7742": (225.0, 64),
    "EPYC 7543": (225.0, 32),
    "EPYC 7502": (180.0, 32),
    "Xeon Platinum 8480+": (350.0, 56),
    "Xeon Platinum 8380": (270.0, 40),
    "Xeon Gold 6248": (150.0, 20),
    "Xeon Gold 6148": (150.0, 20),
    "Xeon E5-2690 v4": (135.0, 14),
    "Core i9-12900K": (125.0, 16),
    "Core i7-10700": (65.0, 8),
    "Ryzen 9 5950X": (105.0, 16),
    "Ryzen 7 5800X": (105.0, 8),
}
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CorePower:
    """Watts per busy CPU and where the figure comes from (said in the run's tags)."""

    watts: float
    source: str


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name (``"AMD EPYC 7763 64-Core Processor"``), or ``""`` where unreadable."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def known_tdp(model: str) -> tuple[str, float, int] | None:
    """``(key, TDP W, cores)`` of a model in :data:`KNOWN_CPUS`, or ``None``."""
    clean = re.sub(r"\((R|TM|tm)\)", "", model)
    clean = re.sub(r"\s+", " ", clean)
    for key, (tdp_w, cores) in KNOWN_CPUS.items():
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", clean, flags=re.IGNORECASE):
            return key, tdp_w, cores
    return None


def core_power(tdp_w: float | None, model: str, visible_cores: int, visible_cpus: int | None = None) -> CorePower:
    """Watts per busy CPU: the user's ``cpu_tdp_w`` over the cores this machine shows, else the
    known model's TDP over its cores, else :data:`DEFAULT_CORE_W`; where a core runs several hardware
    threads (SMT: ``visible_cpus`` logical CPUs on ``visible_cores`` cores), its watts are shared by them,
    so every CPU busy costs the TDP, not twice it (CPU time is counted per logical CPU)."""
    threads = max(1.0, (visible_cpus or visible_cores) / max(1, visible_cores))
    if tdp_w is not None:
        cores = max(1, visible_cores)
        core = CorePower(tdp_w / cores, f"cpu_tdp_w {tdp_w:g} W / {cores} cores visible")
    elif (known := known_tdp(model)) is not None:
        key, package_w, cores = known
        core = CorePower(package_w / cores, f"{key}: {package_w:g} W TDP / {cores} cores (vendor spec)")
    else:
        core = CorePower(DEFAULT_CORE_W, f"{model or 'unknown CPU'}: {DEFAULT_CORE_SOURCE}")
    if threads > 1:
        return CorePower(core.watts / threads, f"{core.source}, a core's shared by its {threads:g} hardware threads")
    return core


def _cgroup_quota_cpus(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), or ``None``."""
    rel: list[str] = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                rel.append(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    candidates = [root / r / "cpu.max" for r in rel] + [root / "cpu.max"]
    for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        candidates += [root / v1 / r / "cpu.cfs_quota_us" for r in rel] + [root / v1 / "cpu.cfs_quota_us"]
    for path in candidates:
        try:
            text = path.read_text().split()
            if path.name == "cpu.max":
                quota, period = text[0], text[1] if len(text) > 1 else "100000"
            else:
                quota, period = text[0], (path.parent / "cpu.cfs_period_us").read_text().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[float, str]:
    """How many CPUs this process may keep busy (affinity, then the cgroup quota), and how we know."""
    try:
        affinity = len(os.sched_getaffinity(0))
        how = f"{affinity} CPUs in affinity"
    except AttributeError:  # macOS, Windows
        affinity = os.cpu_count() or 1
        how = f"{affinity} CPUs"
    quota = _cgroup_quota_cpus(root, proc_cgroup)
    if quota is not None and quota < affinity:
        return quota, f"{how}, cgroup quota {quota:g}"
    return float(affinity), how


class Senders:
    """This process's MLflow senders (``python -m green_callbacks.sinks``, started by ``sinks.launch``), whose CPU is
    the telemetry's, not the training's.

    - ``pids``: the live ones, registered as they start. They are known by pid, not only by their command line,
      which a listing that catches one between its fork and its exec reads as this process's own (it was then taken
      for a worker, and its MLflow import, seconds of CPU, went into the training's estimate: 8.8 J against 1.1 J).
    - ``seconds``: the CPU seconds of those this process reaped. A reaped child's seconds join ``os.times()``'s
      ``children_*`` fields, which :class:`ProcessTree` counts (one reaped during the next training put its MLflow
      import in that training's estimate: 14.7 J against 1.0 J for the same training).
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __contains__(self, pid: int) -> bool:
        return pid in self.pids

    def started(self, pid: int) -> None:
        with self._lock:
            self.pids.add(pid)

    def exited(self, seconds: float) -> None:
        """One of them exited after ``seconds`` of CPU; called before it is reaped (the reaping adds them to
        ``children_*``), so the tree's total never counts them."""
        with self._lock:
            self.seconds += seconds

    def reaped(self, pid: int) -> None:
        """``pid`` was reaped: it may be a worker's next."""
        with self._lock:
            self.pids.discard(pid)


SENDERS = Senders()


class ProcessTree:
    """Cumulative CPU seconds of a process, its live descendants and its reaped children.

    A child's seconds move from the live list to its parent's ``children_*`` fields when the parent
    reaps it; for the moment in between (exited, not yet reaped) the sum can dip, so the total is
    kept monotonic. The descendants are listed every ``rescan_s`` by walking the tree's own
    ``/proc/<pid>/task/<tid>/children`` files (one small read per thread of the tree); where the
    kernel lacks them (``CONFIG_PROC_CHILDREN``), by psutil's scan of every process of the machine,
    whose cost grows with the machine's process count (2.6-3.1 ms for 114 processes here, held in
    Python by the sampler thread, so it takes the GIL from the training loop once a second). Between
    scans each known process costs one ``/proc/<pid>/stat`` read. A child that lives less than
    ``rescan_s`` is still counted once its parent reaps it.

    This package's own MLflow sender (``python -m green_callbacks.sinks``, a child of the training)
    is left out: its CPU is the telemetry's cost, not the training's (docs/performance.md counts it),
    and MLflow's import alone would add seconds of CPU to a short training's estimate.
    """

    SENDER = ("-m", "green_callbacks.sinks")

    def __init__(self, psutil: Any, pid: int | None = None, rescan_s: float = 1.0) -> None:
        self._psutil = psutil
        self.root = psutil.Process(pid or os.getpid())
        self.rescan_s = rescan_s
        self._children: list[Any] = []
        self._scanned_s = -math.inf
        self._total_s = 0.0
        self._senders: dict[int, bool] = {}  # pid -> whether it is this package's MLflow sender
        self._peers: list[Any] = []  # other roots: this node's ranks that are not descendants (Ray, ddp_spawn)
        self.processes = 1  # the most processes seen at once (root included)
        try:
            self._own_argv = self.root.cmdline()
        except self._psutil.Error:
            self._own_argv = []
        self.walks_children_files = _children_files_readable()

    def add_peers(self, pids: list[int]) -> None:
        """Also count these processes and their descendants (the node's other ranks) unless already in the tree."""
        for pid in pids:
            try:
                self._peers.append(self._psutil.Process(pid))
            except self._psutil.Error:
                continue
        self._scanned_s = -math.inf

    def _is_sender(self, child: Any) -> bool:
        """Whether ``child`` is one of this process's MLflow senders (:data:`SENDERS`) or runs
        ``-m green_callbacks.sinks`` (its command line read once per process; a child still showing this process's
        own command line, forked and not yet exec'd, is asked again at the next listing)."""
        if child.pid in SENDERS:
            return True
        known = self._senders.get(child.pid)
        if known is None:
            try:
                argv = child.cmdline()
            except self._psutil.Error:
                argv = []
            known = any(tuple(argv[i:i + 2]) == self.SENDER for i in range(len(argv)))
            if known or argv != self._own_argv:
                self._senders[child.pid] = known
        return known

    @staticmethod
    def _seconds(times: Any) -> float:
        return times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)

    def descendants(self, root: Any) -> list[Any]:
        """``root``'s live descendants as psutil processes (see the class for how they are found)."""
        if not self.walks_children_files:
            return root.children(recursive=True)
        out = []
        for pid in _descendant_pids(root.pid):
            try:
                out.append(self._psutil.Process(pid))
            except self._psutil.Error:  # exited since its parent listed it
                continue
        return out

    def cpu_seconds(self, now_s: float, rescan_s: float | None = None) -> float:
        """CPU seconds of the tree (monotonic); ``now_s`` decides when to list descendants again: at least
        ``rescan_s`` (default :attr:`rescan_s`) after the last listing."""
        if now_s - self._scanned_s >= (self.rescan_s if rescan_s is None else rescan_s):
            try:
                found = self.descendants(self.root)
                inside = {c.pid for c in found} | {self.root.pid}
                for peer in self._peers:  # a rank started beside this one, not by it
                    if peer.pid not in inside:
                        try:
                            more = [peer, *self.descendants(peer)]
                        except self._psutil.Error:
                            continue
                        found += [c for c in more if c.pid not in inside]
                        inside |= {c.pid for c in more}
                live = {c.pid for c in found}
                self._senders = {pid: v for pid, v in self._senders.items() if pid in live}  # pids get reused
                self._children = [c for c in found if not self._is_sender(c)]
            except self._psutil.Error:
                self._children = []
            self._scanned_s = now_s
            self.processes = max(self.processes, 1 + len(self._children))
        if self.root.pid == os.getpid():  # this process: system calls, not a /proc parse (20 times a second)
            own = os.times()  # (its reaped children's, in clock ticks; its reaped senders' left out)
            total = _own_cpu_s(own) + own.children_user + own.children_system - SENDERS.seconds
        else:
            total = self._seconds(self.root.cpu_times())
        alive = []
        for child in self._children:
            if child.pid in SENDERS:  # (a sender listed before its start registered it)
                continue
            try:
                total += self._seconds(child.cpu_times())
            except self._psutil.Error:  # exited: its seconds reach the parent's children_* when reaped
                continue
            alive.append(child)
        self._children = alive
        self._total_s = max(self._total_s, total)
        return self._total_s


def _own_cpu_s(times: Any) -> float:
    """This process's CPU seconds, all threads: the scheduler's own count in nanoseconds where the system has it
    (``CLOCK_PROCESS_CPUTIME_ID``). ``os.times`` and ``/proc`` count 10-ms clock ticks, so an estimate at 12 W a
    core moved in steps of 0.12 J: most windows of a short interval read 0 J and the next one a whole step."""
    clock = getattr(time, "CLOCK_PROCESS_CPUTIME_ID", None)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:
            pass
    return float(times.user + times.system)


def _children_files_readable() -> bool:
    """Whether this kernel lists each thread's children in ``/proc`` (``CONFIG_PROC_CHILDREN``)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb", buffering=0) as f:
            f.read()
    except OSError:
        return False
    return True


def _descendant_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from the ``children`` file of each thread of each process in the
    tree: reads in proportion to the tree's threads, not to the machine's processes."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:  # exited
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb", buffering=0) as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):  # the thread ended
                continue
            out += kids
            todo += kids
    return out


def machine_busy_seconds(psutil: Any) -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine since boot (all processes)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total

