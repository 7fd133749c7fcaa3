"""The energy meter: owns the sensors and one sampler thread, and measures named windows."""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from green_callbacks.sensors.base import Method, Reading, Sensor, log
from green_callbacks.units import brief, is_finite_number

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PERIOD_S = 0.05
COMPONENTS = ("gpu", "cpu", "dram")


@dataclass(frozen=True)
class Measurement:
    """What one window cost: joules per component and device, power, and how it was known.

    ``joules[component][device]`` and ``methods[component][device]`` run in parallel;
    ``start_s``/``end_s`` are monotonic seconds, ``start_unix`` wall-clock seconds.
    """

    name: str
    start_s: float
    end_s: float
    start_unix: float
    joules: Mapping[str, Mapping[str, float]]
    methods: Mapping[str, Mapping[str, Method]]
    peak_power_w: Mapping[str, float] = field(default_factory=dict)
    # devices whose reads were failing at the window's end (short of their joules) or start (joules from before it)
    stale: frozenset[str] = frozenset()
    ids: Mapping[str, str] = field(default_factory=dict)  # a GPU label's physical device (its UUID; see Sensor.ids)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def component_j(self, component: str) -> float:
        return sum(self.joules.get(component, {}).values())

    @property
    def total_j(self) -> float:
        return sum(self.component_j(c) for c in self.joules)

    def method(self, component: str) -> Method:
        """The component's method: the weakest of its devices'."""
        return Method.weakest(list(self.methods.get(component, {}).values()))

    def mean_power_w(self, component: str) -> float:
        return self.component_j(component) / self.duration_s if self.duration_s > 0 else 0.0


class DecimatingTrace:
    """A power trace of bounded length covering the whole run.

    When ``capacity`` points are held, neighbours are averaged pairwise and the stride doubles,
    so a 24-hour run keeps the same memory as a 5-minute one at coarser resolution.
    """

    def __init__(self, columns: Sequence[str], capacity: int = 4096) -> None:
        if capacity < 2:
            raise ValueError(f"trace capacity={capacity} must be at least 2")
        self.columns = list(columns)
        self.capacity = capacity
        self.stride = 1
        self._points: list[tuple[float, ...]] = []
        self._acc: list[float] | None = None
        self._n = 0

    def add(self, t_s: float, values: Sequence[float]) -> None:
        row = (t_s, *values)
        self._acc = list(row) if self._acc is None else [a + b for a, b in zip(self._acc, row, strict=True)]
        self._n += 1
        if self._n < self.stride:
            return
        self._points.append(tuple(a / self._n for a in self._acc))
        self._acc, self._n = None, 0
        if len(self._points) >= self.capacity:
            pts = self._points
            self._points = [tuple((a + b) / 2 for a, b in zip(pts[i], pts[i + 1], strict=True))
                            for i in range(0, len(pts) - 1, 2)]
            self.stride *= 2

    def rows(self) -> list[tuple[float, ...]]:
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)


@dataclass
class _Open:
    start_s: float
    start_unix: float
    start: list[Reading]
    peak_w: dict[str, float]


class EnergyMeter:
    """Measures named, nestable windows over a set of sensors.

    One daemon thread samples every sensor each ``period_s`` (power integration, counter
    wraparound, the power trace, peak power of open windows). Opening and closing a window
    reads each sensor once in the caller's thread; nothing there waits on the sampler beyond
    a lock held for a few arithmetic operations.

    Args:
        sensors: the energy sources (see :func:`green_callbacks.sensors.build_sensors`).
        period_s: sampling period in seconds (default 50 ms; sample faster than the sensors
            refresh).
        trace_capacity: points kept in the power trace (memory stays flat, see
            :class:`DecimatingTrace`).
        cuda_sync: synchronise CUDA at window edges so queued GPU work lands in the window
            that queued it; ``None`` does so when torch has CUDA initialised.
        clock: monotonic clock in seconds (tests pin it to a fake GPU's clock).
    """

    def __init__(
        self,
        sensors: Sequence[Sensor],
        period_s: float = DEFAULT_PERIOD_S,
        trace_capacity: int = 4096,
        cuda_sync: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not is_finite_number(period_s) or not period_s > 0:
            raise ValueError(f"period_s={brief(period_s)} must be a positive, finite number of seconds")
        if isinstance(trace_capacity, bool) or not isinstance(trace_capacity, numbers.Integral) or trace_capacity < 2:
            raise ValueError(f"trace_capacity={brief(trace_capacity)} must be a whole number of trace points >= 2")
        self.sensors = list(sensors)
        self.period_s = float(period_s)
        self.cuda_sync = cuda_sync
        self.clock = clock
        self.components = [c for c in COMPONENTS if any(s.component == c for s in self.sensors)]
        self.ids = {d: i for s in self.sensors if s.component == "gpu" for d, i in getattr(s, "ids", dict)().items()}
        self.trace = DecimatingTrace([f"{c}_w" for c in self.components], trace_capacity)
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0_s = 0.0
        self._broken: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EnergyMeter:
        if self._thread is not None:
            return self
        self._t0_s = self.clock()
        for i, sensor in enumerate(self.sensors):
            self._guard(i, sensor.start, self._t0_s)
        self._thread = threading.Thread(target=self._run, name="green-callbacks-sampler", daemon=True)
        self._thread.start()
        return self

    @property
    def measurable(self) -> bool:
        """Whether any sensor measures anything (after :meth:`start`: one that failed, a GPU unreadable from the
        start, does not)."""
        return any(s.measurable for i, s in enumerate(self.sensors) if i not in self._broken)

    def settle(self) -> None:
        """Before the last reading: each sensor decides a fault still under way (a GPU whose reads fail now)."""
        now = self.clock()
        for i, sensor in enumerate(self.sensors):
            self._guard(i, sensor.settle, now)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period_s + 1.0)
        for sensor in self.sensors:  # a sensor that failed too: its handles and threads are released
            try:
                sensor.close()
            except Exception as exc:
                log.debug("closing the %s sensor failed: %r", sensor.component, exc)

    @property
    def t0_s(self) -> float:
        """The clock reading at ``start``: the trace's time zero."""
        return self._t0_s

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, i: int, fn: Callable, *args: float):  # type: ignore[type-arg]
        """Call a sensor; a bug or fault inside it disables that sensor, never the run."""
        if i in self._broken:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._broken.add(i)
            log.warning("%s sensor failed (%r); its energy is 'unavailable' from now on.",
                        self.sensors[i].component, exc)
            return None

    def _run(self) -> None:
        next_s = self.clock()
        while not self._stop.is_set():
            self.tick(self.clock())
            next_s += self.period_s
            self._stop.wait(max(0.0, next_s - self.clock()))

    def tick(self, now: float) -> None:
        """One sampler step: every sensor sampled, the trace and open windows' peaks updated."""
        power = {c: 0.0 for c in self.components}
        for i, sensor in enumerate(self.sensors):
            watts = self._guard(i, sensor.sample, now)
            if watts:
                power[sensor.component] += sum(watts.values())
        with self._lock:
            self.trace.add(now - self._t0_s, [power[c] for c in self.components])
            for window in self._open.values():
                for c, w in power.items():
                    window.peak_w[c] = max(window.peak_w.get(c, 0.0), w)

    # -- windows ---------------------------------------------------------------------------
    @property
    def syncs_cuda(self) -> bool:
        """Whether window edges synchronise CUDA: ``cuda_sync`` is not ``False`` and torch has a CUDA context
        (``is_initialized``, a flag: ``is_available()`` costs about 10 µs a call)."""
        import sys

        torch = sys.modules.get("torch")
        return self.cuda_sync is not False and torch is not None and torch.cuda.is_initialized()

    def _sync(self) -> None:
        if self.syncs_cuda:
            import torch

            torch.cuda.synchronize()

    def _read_all(self, now_s: float, cheap: bool = False, first: dict[int, Reading] | None = None) -> list[Reading]:
        readings = []
        for i, sensor in enumerate(self.sensors):
            reading = (first or {}).get(i) or self._guard(i, sensor.peek if cheap else sensor.read, now_s)
            readings.append(reading if reading is not None else Reading(
                {d: 0.0 for d in sensor.devices}, {d: Method.UNAVAILABLE for d in sensor.devices}))
        return readings

    def _edge(self) -> tuple[float, list[Reading]]:
        """A window edge: its instant and every sensor's reading. The first sensor that reads at an instant of its own
        (GPU counters read off the training thread, at the clock's reading there: ``GpuEnergySensor.edge``) sets it,
        and the others are read at it."""
        self._sync()
        for i, sensor in enumerate(self.sensors):
            edge = getattr(sensor, "edge", None)
            got = self._guard(i, edge, self.clock) if edge is not None else None
            if got is not None:
                now, reading = got
                return now, self._read_all(now, first={i: reading})
        now = self.clock()
        return now, self._read_all(now)

    def begin(self, name: str, at_start_of: str | None = None) -> None:
        """Open window ``name`` (windows nest and may overlap; names are unique while open).

        ``at_start_of``: open it at the instant, and with the readings, that open window began at (no
        sensor read): for a window that starts where the previous point left off.
        """
        if name in self._open:
            raise ValueError(f"window {name!r} is already open; open windows: {sorted(self._open)}")
        like = self._open.get(at_start_of) if at_start_of is not None else None
        if like is not None:
            with self._lock:
                self._open[name] = _Open(like.start_s, like.start_unix, like.start, dict(like.peak_w))
            return
        now, start = self._edge()
        with self._lock:
            self._open[name] = _Open(now, time.time(), start, {})

    def is_open(self, name: str) -> bool:
        return name in self._open

    def peek(self, name: str) -> Measurement:
        """What open window ``name`` has cost so far, leaving it open.

        Cheap enough for every few steps: no CUDA sync, and sensors give their cheap reading
        (an NVML energy counter read costs milliseconds on some GPUs; see ``NvmlSensor.peek``).
        """
        if name not in self._open:
            raise ValueError(f"window {name!r} is not open; open windows: {sorted(self._open)}")
        now = self.clock()
        window = self._open[name]
        return self._measure(name, window.start_s, now, window.start_unix, window.start,
                             self._read_all(now, cheap=True), dict(window.peak_w))

    def end(self, name: str, reopen: bool = False) -> Measurement:
        """Close window ``name`` and return what it cost; with ``reopen``, open it again at the same
        instant (consecutive windows, no gap, one sensor read)."""
        return self.end_many((name,), reopen=(name,) if reopen else ())[0]

    def end_many(self, names: Sequence[str], reopen: Container[str] = (), keep: Container[str] = ()
                 ) -> list[Measurement]:
        """Close several windows at one instant, with one sensor read (an epoch's end closes the
        epoch and the interval); those in ``reopen`` open again at that instant; those in ``keep`` are
        measured to it and stay open (what an open window cost so far, read exactly, unlike :meth:`peek`)."""
        missing = [n for n in names if n not in self._open]
        if missing:
            raise ValueError(f"window {missing[0]!r} is not open; open windows: {sorted(self._open)}")
        now, end = self._edge()
        out = []
        with self._lock:
            for name in names:
                window = self._open[name] if name in keep else self._open.pop(name)
                if name in reopen:
                    self._open[name] = _Open(now, time.time(), end, {})
                out.append((name, window))
        return [self._measure(name, w.start_s, now, w.start_unix, w.start, end, w.peak_w) for name, w in out]

    def since_start(self) -> Measurement:
        """Everything measured since ``start``, as a window named ``run``."""
        now, end = self._edge()
        zero = [Reading({d: 0.0 for d in s.devices}, {}) for s in self.sensors]
        return self._measure("run", self._t0_s, now, time.time() - (now - self._t0_s), zero, end, {})

    def _measure(self, name: str, start_s: float, end_s: float, start_unix: float,
                 start: list[Reading], end: list[Reading], peak_w: dict[str, float]) -> Measurement:
        joules: dict[str, dict[str, float]] = {c: {} for c in self.components}
        methods: dict[str, dict[str, Method]] = {c: {} for c in self.components}
        stale: set[str] = set()
        for sensor, a, b in zip(self.sensors, start, end, strict=True):
            for device, j_end in b.joules.items():
                joules[sensor.component][device] = max(0.0, j_end - a.joules.get(device, 0.0))
                methods[sensor.component][device] = b.methods.get(device, Method.UNAVAILABLE)
            stale |= b.stale | a.short  # short at the start too: the reads that resume bring the gap's joules into
            # this window (an outage over two epochs put its energy in the third, +191 %, as a measurement)
        peak_w = dict(peak_w)
        if end_s > start_s:  # a window with no sampler tick in it (shorter than the period): at least its mean
            for c, per_device in joules.items():
                if c not in peak_w and sum(per_device.values()) > 0:  # (a tick's peak stands: a window shorter
                    peak_w[c] = sum(per_device.values()) / (end_s - start_s)  # than a counter's refresh reads high)
        return Measurement(name, start_s, end_s, start_unix, joules, methods, peak_w, frozenset(stale), self.ids)

    def describe(self) -> dict[str, dict[str, str]]:
        """Per component, what each device is (names, UUIDs, zones), for the run's params."""
        out: dict[str, dict[str, str]] = {}
        for sensor in self.sensors:
            out.setdefault(sensor.component, {}).update(sensor.describe())
        return out

    def trace_frame(self) -> pd.DataFrame:
        """The power trace as a DataFrame: ``time_s`` since start and one ``<component>_w`` each."""
        import pandas as pd

        with self._lock:
            rows = self.trace.rows()
        return pd.DataFrame(rows, columns=["time_s", *self.trace.columns])
