"""What every GPU vendor's sensor shares: an energy counter where it works, sampled power elsewhere.

A vendor module (``nvml.py``, ``amd.py``) finds the devices and says how to read one device's
counter and power; :class:`GpuEnergySensor` decides the method per device, switches it when the
hardware misbehaves (counter NOT_SUPPORTED, stuck, reset, a lost device) and keeps the joules
measured before any switch.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from green_callbacks.sensors.base import Method, Reading
from green_callbacks.sensors.edge_reader import EdgeReader, Hung, Reads, released
from green_callbacks.sensors.gpu_state import GpuDeviceStates, GpuState
from green_callbacks.sensors.targets import GpuTarget

__all__ = ["GpuDeviceStates", "GpuEnergySensor", "GpuState"]


class GpuEnergySensor(GpuDeviceStates):
    """GPU energy per device: the counter every ``counter_poll_s`` (and at window edges where a read is
    cheap), else sampled power.

    Window edges: a counter read costs microseconds on some GPUs and milliseconds of driver time on
    others (2.4 ms median, 21 ms at worst, on an H100 and an H200 with driver 580), paid on the
    training thread at every edge. So ``start`` times five reads, and the edges read the counter
    only where the fastest of them took at most ``edge_read_max_s`` (the fastest: a preemption or a
    wait for the GIL lengthens a read, never shortens it); otherwise an edge is the last counter value
    (polled by the sampler thread, off the training thread) plus the instant power integrated since
    it, at most ``counter_poll_s`` of sampled power. Consecutive windows share their edges, so the
    run's total stays the counter's (or, where the last edge's power ran ahead of the counter, that
    edge: readings never go back, so at most one poll's power error); only the split between windows is
    interpolated, and a counter that refreshes every 100 ms (as these GPUs' do) resolves no window more
    finely anyway. An edge's counter reads run on the sensor's edge-reader thread, and the edge waits for them at most
    ``edge_wait_s``: a read that hangs (a driver call stuck for seconds) delays training by that at most, the edge shows
    that device's last poll plus the power since, and the read is taken in when it returns. The thread switch (about
    0.1 ms) is the edge's cost, and how late after the edge's timestamp the counters are read.

    Subclasses implement ``_counter_j`` (the device's cumulative counter in joules),
    ``_power_now_w`` (its power now) and ``_not_supported`` (whether an error means the feature
    is absent rather than the device failing), and may implement ``_gone`` (whether an error says the
    device is gone for good). Any other error is taken as passing (a timeout, a busy driver): the read is
    retried, a counter's next read covering the gap exactly and sampled power interpolating across it,
    and only reads failing for ``lost_after_s`` without a success make the device unavailable. Where a vendor sets
    ``stuck_after_s``, a counter that stays still that long while power says at least ``stuck_min_j`` was spent is
    declared stuck (MI100, ROCm/amdsmi#38) and the device is sampled instead; the power integrated meanwhile is
    kept.
    """

    component = "gpu"
    edge_read_max_s = 0.001  # a counter whose fastest read at start took longer is not read at window edges
    edge_read_slow_s = 0.01  # edge counter reads slower than this, edge_slow_reads in a row, end them for the run
    edge_slow_reads = 3  # (one slow read is a preemption or a wait for the GIL on a busy machine, not a slow driver)
    settle_wait_s = 0.5  # the longest the end of measuring waits for a library call of the sampler's under way
    start_wait_s = 2.0  # the longest the start waits for a device's first counter reads (then: unavailable)
    edge_wait_s = 0.02  # the longest an edge waits for its counter read (then it shows the last reads, see the class)
    reads_ended = True  # after close: whether no edge read was left under way in the library
    hung_after_s = 0.5  # a call under way this long at an edge is one that hangs: nothing read since it began

    def __init__(self, targets: list[GpuTarget], use_counter: bool = True, counter_poll_s: float = 1.0) -> None:
        super().__init__()
        if not counter_poll_s >= 0:
            raise ValueError(f"counter_poll_s={counter_poll_s!r} must be a number of seconds >= 0")
        self.use_counter = use_counter
        self.counter_poll_s = float(counter_poll_s)
        self.counter_read_s: float | None = None  # the fastest of the counter reads timed at start
        self._slow_edge_reads = 0  # edge counter reads slower than edge_read_slow_s in a row
        self._lock = threading.Lock()  # the devices' state: held for arithmetic only, never across a library call
        self._gpus = [GpuState(t) for t in targets]
        self._reader = EdgeReader(f"green-callbacks-edges-{self.library}")
        self._started = False
        for gpu in self._gpus:
            if not gpu.target.measurable:
                self.warn_once(f"unmeasurable-{gpu.target.label}", gpu.target.reason)

    @property
    def devices(self) -> list[str]:
        return [g.target.label for g in self._gpus]

    @property
    def measurable(self) -> bool:
        """Any GPU with a handle; after :meth:`start`, any that was read (one unreadable from the start is lost)."""
        return any(g.target.measurable and not (self._started and g.method is Method.UNAVAILABLE) for g in self._gpus)

    def ids(self) -> dict[str, str]:
        return {g.target.label: f"{g.target.uuid}@{g.target.bus}" if g.target.bus else g.target.uuid
                for g in self._gpus if g.target.uuid}

    def describe(self) -> dict[str, str]:
        out = {g.target.label: f"{g.target.name} ({g.target.uuid})" for g in self._gpus}
        if self.counter_read_s is not None:
            cost = f"a counter read costs {1e6 * self.counter_read_s:.0f} µs (fastest of 5 at start)"
            out["edges"] = (f"window edges read the counter ({cost})" if self._edges_read_counter() else
                            f"window edges: the last counter read + instant power since ({cost})")
        return out

    def _edges_read_counter(self) -> bool:
        """Whether a window edge reads the counter: where a read was cheap at start."""
        return self.counter_read_s is None or self.counter_read_s <= self.edge_read_max_s

    def _timed_read_j(self, gpu: GpuState, reads: int) -> tuple[float, float]:
        """The counter read ``reads`` times: its last value and the fastest read's seconds."""
        fastest, value = float("inf"), 0.0
        for _ in range(reads):
            t = time.perf_counter()
            value = self._counter_j(gpu)
            fastest = min(fastest, time.perf_counter() - t)
        return value, fastest

    def _start_reads(self, gpu: GpuState) -> tuple[float, float]:
        """The counter read five times, timed, on the edge reader: its last value and the fastest read's seconds;
        what a read raised; or :class:`Hung` where the reads had not returned within ``start_wait_s`` (a driver call
        that hangs: training starts anyway, that device unmeasured)."""
        out: dict[str, Any] = {}

        def reads(at: float) -> bool:
            try:
                out["value"] = self._timed_read_j(gpu, 5)
            except Exception as exc:
                out["exc"] = exc
            return True

        if not gpu.io.acquire(timeout=self.start_wait_s):
            raise Hung(f"a call on it had not returned after {self.start_wait_s:g} s at start")
        self._reader.submit([(gpu.target.label, reads, gpu.io, True)], 0.0, math.inf).wait(self.start_wait_s)
        if "exc" in out:
            raise out["exc"]
        if "value" not in out:
            raise Hung(f"its energy counter read had not returned after {self.start_wait_s:g} s at start")
        return out["value"]

    def start(self, now_s: float) -> None:
        timings = []
        for gpu in self._gpus:
            if not gpu.target.measurable:
                continue
            if not self.use_counter:
                self._start_sampling(gpu, now_s)
                continue
            try:
                gpu.counter_last_j, fastest_s = self._start_reads(gpu)
            except Hung as exc:  # no library call on it meanwhile: a power read would hang as likely
                self._lose(gpu, exc, now_s)
            except Exception as exc:
                self._start_sampling(gpu, now_s)
                if gpu.failing_since is not None and gpu.method is Method.SAMPLED:  # nothing read: no gap to span
                    self._lose(gpu, gpu.failing_exc or RuntimeError("no reading"), now_s)
                elif gpu.method is Method.SAMPLED and not self._absent(exc):  # (a GPU without one: as designed)
                    self.warn_once(f"counter-start-{gpu.target.label}", f"{gpu.target.label}: its energy counter "
                                   f"failed at start ({exc!r}); sampling its power instead (method 'sampled').")
            else:
                gpu.method = Method.COUNTER
                gpu.polled_s = gpu.changed_s = now_s
                timings.append(fastest_s)
        if timings:
            self.counter_read_s = min(timings)
            if self._edges_read_counter():
                with contextlib.suppress(RuntimeError):  # (no thread to start: edges read in the caller's thread)
                    self._reader.start()
        self._started = True

    def settle(self, now_s: float) -> None:
        """Measuring ends: a device whose reads are failing now (not yet for ``lost_after_s``) is lost, with one
        warning, so that the energy not counted since its first failure is recorded as 'unavailable'. Each counter
        is read once (the sampler polls it once a second, so a failure may not have been seen yet), waiting at most
        ``settle_wait_s`` in all for calls under way (the sampler's, or an edge's still on the edge reader) and for
        its own reads; one that has not returned by then is a failing read of its device."""
        started = time.monotonic()
        deadline = started + self.settle_wait_s
        for gpu in self._gpus:
            if gpu.method is Method.UNAVAILABLE:
                continue
            if gpu.io.acquire(timeout=max(0.0, deadline - time.monotonic())):
                if gpu.method is not Method.COUNTER or gpu.failing_since is not None:
                    gpu.io.release()  # nothing to read: a sampled device's reads are the sampler's
                    continue
                job = self._submit([gpu], now_s, held=True)
                if job.done.wait(max(0.0, deadline - time.monotonic())):
                    continue
                what, since = "counter", now_s  # its own read, still under way
            elif gpu.in_flight is not None:
                what, since = gpu.in_flight  # a call of the sampler's, or of an edge's, under way
            else:
                continue
            with self._lock:
                if gpu.failing_since is None and gpu.method is not Method.UNAVAILABLE:
                    # nothing of it read since the call began: the power since is not carried into what is kept
                    gpu.power_failing_since = since if gpu.power_failing_since is None else gpu.power_failing_since
                    gpu.failing_since = since
                    gpu.failing_exc = TimeoutError(f"a {what} read has not returned for "
                                                   f"{now_s - since + time.monotonic() - started:.1f} s")
        with self._lock:
            for gpu in self._gpus:
                if gpu.failing_since is None or gpu.method is Method.UNAVAILABLE:
                    continue
                self.warn_once(
                    f"lost-{gpu.target.label}",
                    f"{gpu.target.label}: {self.library} reads had failed for {now_s - gpu.failing_since:.2f} s when "
                    f"measuring ended ({gpu.failing_exc}): what they could not read is not counted, so the device "
                    "is recorded as 'unavailable'; the joules measured are kept.",
                )
                self._lose(gpu, gpu.failing_exc or RuntimeError("no reading"), now_s)

    def _edge_poll(self, gpu: GpuState, now_s: float) -> bool:
        """Holding ``gpu.io``: a counter device's counter, where its reads are not failing, read and taken in; whether
        it was. A read that took longer than an edge waits (``edge_wait_s``: the edge has shown the last read plus the
        power since) is taken in at the instant it returned, when its value was read, not at the edge's: the power
        integrated from the edge on would count that stretch again. ``edge_slow_reads`` reads in a row slower than
        ``edge_read_slow_s`` end counter reads at the edges for the rest of the run (they show the last poll plus the
        power since, as where reads were slow at start); one such read is a preemption, not a slow driver."""
        if gpu.method is not Method.COUNTER or gpu.failing_since is not None:
            return False  # while reads fail the sampler thread retries: no edge waits on a failing device
        gpu.in_flight = ("counter", now_s)
        try:
            t = time.perf_counter()
            value_j, exc = self._read(self._counter_j, gpu)
            took_s = time.perf_counter() - t
        finally:
            gpu.in_flight = None
        with self._lock:
            if self.counter_read_s is not None:
                self._slow_edge_reads = self._slow_edge_reads + 1 if took_s > self.edge_read_slow_s else 0
                if self._slow_edge_reads >= self.edge_slow_reads:
                    self.counter_read_s = max(self.counter_read_s, took_s)
            return self._take_counter(gpu, now_s + took_s if took_s > self.edge_wait_s else now_s, value_j, exc)

    def _submit(self, gpus: list[GpuState], at: float | Callable[[], float], held: bool = False) -> Reads:
        """:meth:`_edge_poll` for each of ``gpus`` on the edge reader (see :class:`EdgeReader`), at the instant ``at``
        (or, given a clock, at its reading there, right before the reads); ``held``: the caller holds their ``io`` locks
        and hands them over."""
        return self._reader.submit([(gpu.target.label, lambda now_s, gpu=gpu: self._edge_poll(gpu, now_s), gpu.io,
                                     held) for gpu in gpus], at, self.edge_wait_s)

    def close(self) -> None:
        """The edge reader ends, waiting for a read of its under way at most ``settle_wait_s`` (``reads_ended`` says
        whether none was left: a vendor shuts its library down only then)."""
        self.reads_ended = self._reader.close(self.settle_wait_s) if hasattr(self, "_reader") else True

    def sample(self, now_s: float) -> dict[str, float]:
        """The sampler thread: the counters due a poll, and every device's power. A device's library calls hold its
        ``io`` lock (an edge then shows its last reads), never the state lock a reading takes."""
        for gpu in self._gpus:
            if not gpu.io.acquire(blocking=False):  # an edge's read under way on it (one that hangs holds up no tick)
                continue
            with released(gpu.io):
                try:
                    if gpu.method is Method.COUNTER and now_s - gpu.polled_s >= self.counter_poll_s:
                        gpu.in_flight = ("counter", now_s)
                        at, read = self._timed(self._counter_j, gpu, now_s)
                        with self._lock:
                            self._take_counter(gpu, at, *read)
                    if gpu.method in (Method.COUNTER, Method.SAMPLED):
                        gpu.in_flight = ("power", now_s)
                        at, read = self._timed(self._power_now_w, gpu, now_s)
                        with self._lock:
                            if gpu.method in (Method.COUNTER, Method.SAMPLED):
                                power = self._take_power(gpu, at, *read)
                                gpu.power_w = power or 0.0
                                if power is not None:
                                    (gpu.integrator if gpu.method is Method.SAMPLED else gpu.since_poll).add(at, power)
                    else:
                        gpu.power_w = 0.0
                finally:
                    gpu.in_flight = None
        return {g.target.label: g.power_w for g in self._gpus}

    def _timed(self, read: Callable[[GpuState], float], gpu: GpuState, now_s: float
               ) -> tuple[float, tuple[float | None, Exception | None]]:
        """One library call of the sampler's: the instant its value is taken in at, and the value or error. A call
        slower than ``edge_wait_s`` (one that hung) is taken in at the instant it returned, when its value was read:
        at the tick's, the counter's joules of the hang were counted again by the power integrated from the tick on
        (epochs -47 % and +48 %, labelled 'counter', in a probe of a 3-s hang)."""
        t = time.perf_counter()
        value = self._read(read, gpu)
        took_s = time.perf_counter() - t
        return (now_s + took_s if took_s > self.edge_wait_s else now_s), value

    def read(self, now_s: float) -> Reading:
        """At a window edge: the counter where a read is cheap, else :meth:`peek` (see the class)."""
        return self._reading(now_s, True, self._edge_reads(now_s)[1])

    def edge(self, clock: Callable[[], float]) -> tuple[float, Reading]:
        """A window edge at an instant of its own, and its reading: where edges read counters, ``clock`` (the meter's)
        read on the edge reader right before its reads, so they are made at the edge's instant rather than a thread
        switch (0.1-0.6 ms) after it; else ``clock()`` now."""
        now_s, polled = self._edge_reads(clock)
        return now_s, self._reading(now_s, True, polled)

    def peek(self, now_s: float) -> Reading:
        """Counter devices: the last counter read plus the power integrated since (no library call)."""
        return self._reading(now_s, False, set())

    def _edge_reads(self, at: float | Callable[[], float]) -> tuple[float, set[str]]:
        """An edge reads the counters where reads are cheap, on the edge reader, each where no call is under way on its
        device (it never waits on one: it shows that device's last reads then), and waits for them at most
        ``edge_wait_s``: its instant (see :meth:`edge`), and the devices whose counter was read at it."""
        due = [gpu for gpu in self._gpus if gpu.method is Method.COUNTER and gpu.failing_since is None
               and not gpu.io.locked()] if self._edges_read_counter() else []
        if not due:
            return (at() if callable(at) else at), set()
        job = self._submit(due, at)
        taken = job.wait(self.edge_wait_s)
        instant = job.at
        return (instant if instant is not None else at() if callable(at) else at), taken

    def _reading(self, now_s: float, at_edge: bool, polled: set[str]) -> Reading:
        """The devices' cumulative joules at ``now_s``; ``polled``: those whose counter was read at it. A peek between
        edges (not ``at_edge``) shows, but never holds, what runs ahead."""
        joules, methods, power, stale, short = {}, {}, {}, set(), set()
        with self._lock:
            for gpu in self._gpus:
                carried = self._carried_to(gpu, now_s)
                in_flight = gpu.in_flight
                hung = in_flight is not None and now_s - in_flight[1] > self.hung_after_s and gpu.method in (
                    Method.COUNTER, Method.SAMPLED)
                if hung:  # a call under way on it longer than any edge waits: nothing read since it began
                    carried = min(carried, in_flight[1])  # type: ignore[index]
                if gpu.method is Method.COUNTER:
                    # where counters may be stuck, the power since it last moved too, once it has been still longer
                    # than a working counter ever is: one not yet declared stuck (``stuck_after_s``) shows no 0 J
                    # windows meanwhile
                    since_j = 0.0 if gpu.target.label in polled else gpu.since_poll.joules_at(carried)
                    live = gpu.counter_j + since_j + (
                        gpu.unchanged_j if self.stuck_after_s is not None and now_s - gpu.changed_s >= self.still_s
                        else 0.0)
                else:
                    live = gpu.integrator.joules_at(carried) if gpu.method is Method.SAMPLED else 0.0
                label = gpu.target.label
                # cumulative joules never go back: an edge's power estimate since the last counter read (or, where
                # counters may be stuck, since it last moved) can run ahead of the counter's next value; the
                # reading then holds until the counter catches up, so no window is clamped at 0 and counted twice
                joules[label] = max(gpu.frozen_j + live, gpu.shown_j)
                if at_edge:
                    gpu.shown_j = joules[label]
                methods[label] = gpu.method
                power[label] = gpu.power_w
                if (gpu.failing_since is not None or hung) and gpu.method is not Method.UNAVAILABLE:
                    stale.add(label)  # (a window ending during a hung call is unread, as one during failing reads)
                    if carried < now_s:
                        short.add(label)
        return Reading(joules, methods, power, frozenset(stale), frozenset(short))
