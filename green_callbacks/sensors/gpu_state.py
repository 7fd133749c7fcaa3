"""A GPU's energy, device by device: the method each device is measured by (counter, sampled power,
unavailable), and how a read, or its failure, changes it (a counter NOT_SUPPORTED, stuck, read low,
restarted; a device failing, lost).

:class:`~green_callbacks.sensors.gpu.GpuEnergySensor` makes the reads (when, on which thread, under which lock);
this module decides what each read means. Every method here runs under the sensor's state lock, or before its
sampler starts, and makes no library call but the power read at ``start``.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable

from green_callbacks.sensors.base import Method, Sensor
from green_callbacks.sensors.integrator import PowerIntegrator
from green_callbacks.sensors.targets import GpuTarget


class GpuState:
    """Per-device state: which method, the counter's last value, the integrators."""

    def __init__(self, target: GpuTarget) -> None:
        self.target = target
        self.method = Method.UNAVAILABLE
        self.counter_last_j: float | None = None
        self.counter_j = 0.0  # joules accumulated from counter deltas
        self.frozen_j = 0.0  # joules measured before a switch of method
        self.integrator = PowerIntegrator()
        self.since_poll = PowerIntegrator()  # counter devices: power integrated since the last counter read
        self.unchanged_j = 0.0  # power integrated over earlier reads that left the counter where it was
        self.changed_s = 0.0  # when the counter last moved
        self.polled_s = float("-inf")
        self.power_w = 0.0
        self.failing_since: float | None = None  # when reads of its energy source began to fail, and how
        self.failing_exc: Exception | None = None
        self.power_failing_since: float | None = None  # a counter device's power reads (trace and peak only)
        self.shown_j = 0.0  # the largest cumulative joules a reading has shown
        # the device's library calls, one at a time (the sampler's; an edge's where it can have it at once), so its
        # reads are taken in the order they were made; a device in trouble holds up no other
        self.io = threading.Lock()
        self.in_flight: tuple[str, float] | None = None  # the sampler's call under way on it: what, since when


class GpuDeviceStates(Sensor):
    """Per-device methods and their switches (see the module); the vendor's subclass says how to read a device."""

    component = "gpu"
    library = "the GPU library"
    stuck_after_s: float | None = None  # None: the vendor's counters are trusted to move
    stuck_min_j = 1.0
    still_s = 0.1  # a counter still this long (where counters may be stuck) is shown with the power since it moved
    lost_after_s = 5.0  # a device whose reads fail this long without a success is lost (one error is retried)

    @abc.abstractmethod
    def _counter_j(self, gpu: GpuState) -> float:
        """The device's energy counter in joules (any origin); raises when it cannot be read."""

    @abc.abstractmethod
    def _power_now_w(self, gpu: GpuState) -> float:
        """The device's power in watts, the freshest reading there is; raises when it cannot be read."""

    @abc.abstractmethod
    def _not_supported(self, exc: Exception) -> bool:
        """Whether ``exc`` says the feature does not exist (rather than that the device failed)."""

    def _absent(self, exc: Exception) -> bool:
        """Whether ``exc`` says the device or its driver has no such function (not a fault: nothing to warn)."""
        return self._not_supported(exc)

    _started = False  # set once ``start`` has run: a switch mid-run reads no power (no library call)

    def _gone(self, exc: Exception) -> bool:
        """Whether ``exc`` says the device is gone for good (no retry); the vendor's subclass knows its codes."""
        return False

    def _start_sampling(self, gpu: GpuState, now_s: float) -> None:
        """Sample the device's power from now: at ``start`` from a power read, mid-run (under the state lock, where
        no library call is made) from the last power read, the next sample carrying on from it."""
        switching = gpu.method is Method.COUNTER
        if switching:  # what the counter has not yet shown, from the power since it last moved
            gpu.frozen_j += gpu.counter_j + gpu.unchanged_j + gpu.since_poll.joules_at(now_s)
        gpu.counter_j = gpu.unchanged_j = 0.0
        gpu.integrator = PowerIntegrator()
        gpu.method = Method.SAMPLED
        power = gpu.power_w if self._started else self._power_w(gpu, now_s)
        if power is not None:
            gpu.integrator.add(now_s, power)

    def _read(self, read: Callable[[GpuState], float], gpu: GpuState) -> tuple[float | None, Exception | None]:
        """One library call, made without the state lock: its value, or the error it raised."""
        try:
            return float(read(gpu)), None
        except Exception as exc:
            return None, exc

    def _power_w(self, gpu: GpuState, now_s: float) -> float | None:
        return self._take_power(gpu, now_s, *self._read(self._power_now_w, gpu))

    def _take_power(self, gpu: GpuState, now_s: float, power: float | None, exc: Exception | None) -> float | None:
        """Power now, or ``None``. Where power is the energy source (sampling) a failure is retried (the
        integral spans the gap) until the device counts as lost (:meth:`_failed`); on a counter device power
        only feeds the trace and peak, so the counter carries on."""
        if exc is not None:
            if gpu.method is Method.COUNTER and self._gone(exc):  # the device is gone, its counter with it
                self._failed(gpu, exc, now_s)
            elif gpu.method is Method.COUNTER:
                if gpu.power_failing_since is None:
                    gpu.power_failing_since = now_s
                if now_s - gpu.power_failing_since >= self.lost_after_s and gpu.failing_since is None:
                    self.warn_once(
                        f"power-{gpu.target.label}",
                        f"{gpu.target.label}: power is not readable ({exc}); "
                        "energy still comes from the counter, the power trace shows 0 W.",
                    )
            else:
                self._failed(gpu, exc, now_s)
            return None
        assert power is not None
        gpu.power_failing_since = None
        if gpu.method is Method.SAMPLED:
            self._recovered(gpu, now_s)
        return power

    def _failed(self, gpu: GpuState, exc: Exception, now_s: float) -> None:
        """A read of the device's energy source failed: lost where the error says so, or where its reads have
        failed for ``lost_after_s``; else the next read tries again (one warning when one succeeds)."""
        if gpu.failing_since is None:
            gpu.failing_since, gpu.failing_exc = now_s, exc
        if self._gone(exc) or now_s - gpu.failing_since >= self.lost_after_s:
            self._lose(gpu, exc, now_s)

    def _recovered(self, gpu: GpuState, now_s: float) -> None:
        """A read succeeded: where reads had failed before it, one warning says so and what it cost (nothing)."""
        if gpu.failing_since is not None:
            self.warn_once(
                f"retry-{gpu.target.label}",
                f"{gpu.target.label}: {self.library} reads failed for {now_s - gpu.failing_since:.2f} s "
                f"({gpu.failing_exc}) and were retried; the energy across the gap is kept.",
            )
            gpu.failing_since = gpu.failing_exc = None

    def _carried_to(self, gpu: GpuState, now_s: float) -> float:
        """How far the last power read may be carried: to ``now_s``, or, while the reads of the power being
        integrated fail, to their first failure (a dead GPU's last watts are not carried through the retries)."""
        failing = gpu.failing_since if gpu.method is Method.SAMPLED else gpu.power_failing_since
        return now_s if failing is None else min(now_s, failing)

    def _lose(self, gpu: GpuState, exc: Exception, now_s: float) -> None:
        self.warn_once(
            f"lost-{gpu.target.label}",
            f"{gpu.target.label}: {self.library} failed ({exc}); its energy is 'unavailable' "
            "from now on, the joules measured before are kept.",
        )
        if gpu.method is Method.COUNTER:  # as the last readings had it: no window goes back
            gpu.frozen_j += gpu.counter_j + gpu.unchanged_j + gpu.since_poll.joules_at(self._carried_to(gpu, now_s))
        elif gpu.method is Method.SAMPLED:
            gpu.frozen_j += gpu.integrator.joules_at(self._carried_to(gpu, now_s))
        gpu.counter_j = gpu.unchanged_j = 0.0
        gpu.integrator = PowerIntegrator()
        gpu.method = Method.UNAVAILABLE

    def _restarted(self, gpu: GpuState, last_j: float, value_j: float, now_s: float) -> bool:
        """Whether a counter read below its last value is a restart (a driver reload or a reset: the counter starts
        again from about 0, so it shows at most what was spent since the last read) rather than a read slightly
        low: below half the last value, or no more than twice what power says was spent since the last read."""
        return value_j < 0.5 * last_j or value_j <= 2.0 * gpu.since_poll.joules_at(now_s)

    def _take_counter(self, gpu: GpuState, now_s: float, value_j: float | None, exc: Exception | None) -> bool:
        """A counter read (its value, or its error) taken into the device's state (under the state lock);
        ``False`` where the read failed (the power since the last read still counts)."""
        label = gpu.target.label
        if gpu.method is not Method.COUNTER:  # decided meanwhile (lost at the end, while this read hung)
            return False
        if exc is not None:
            if self._not_supported(exc):
                self.warn_once(
                    f"counter-{label}", f"{label}: the energy counter became NOT_SUPPORTED; switching to sampled power."
                )
                self._start_sampling(gpu, now_s)
            else:
                gpu.polled_s = now_s  # the next try at the next poll, not at every tick
                self._failed(gpu, exc, now_s)
            return False
        assert value_j is not None
        self._recovered(gpu, now_s)
        last = gpu.counter_last_j if gpu.counter_last_j is not None else value_j
        if value_j < last and not self._restarted(gpu, last, value_j, now_s):
            # a read a little below the last one (amdsmi and NVML reads are not always monotone): not a restart,
            # which would count the counter's whole value again; the last value stays the reference, so the next
            # read above it counts exactly what was spent since
            self.warn_once(
                f"lower-{label}",
                f"{label}: the energy counter read {last - value_j:.3f} J below its last value ({last:.3f} -> "
                f"{value_j:.3f} J); that read is ignored and counting goes on from the last value.",
            )
            gpu.polled_s = now_s  # the power since the last value counted still shows
            return False
        if value_j == last:
            gpu.unchanged_j += gpu.since_poll.joules_at(now_s)
            stuck_after_s = self.stuck_after_s
            if (
                stuck_after_s is not None
                and now_s - gpu.changed_s >= stuck_after_s
                and gpu.unchanged_j >= self.stuck_min_j
            ):
                self.warn_once(
                    f"stuck-{label}",
                    f"{label}: the energy counter has not moved for {now_s - gpu.changed_s:.1f} s "
                    f"while power says {gpu.unchanged_j:.1f} J were spent (a counter that does "
                    "not work on this GPU); switching to sampled power.",
                )
                gpu.since_poll = PowerIntegrator()  # already in unchanged_j
                self._start_sampling(gpu, now_s)
                return False
        else:
            gpu.unchanged_j = 0.0
            gpu.changed_s = now_s
            if value_j < last:
                # The counter restarted (driver reload, reset): what it shows now was spent since the restart; the
                # power integrated since the last read covers the part before it too
                self.warn_once(
                    f"reset-{label}",
                    f"{label}: the energy counter went backwards ({last:.3f} -> {value_j:.3f} J); "
                    "treating it as a reset and counting on.",
                )
                gpu.counter_j += max(value_j, gpu.since_poll.joules_at(now_s))
            else:
                gpu.counter_j += value_j - last
        gpu.counter_last_j = value_j
        gpu.polled_s = now_s
        gpu.since_poll = PowerIntegrator()
        gpu.since_poll.add(now_s, gpu.power_w)
        return True
